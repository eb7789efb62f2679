"""Batched command generation: prompts in, one short response per prompt out, cut at the first newline or EOS."""

from dataclasses import dataclass

import torch

from lib.prompts import parse_command


@dataclass
class GenerationConfig:
    max_new_tokens: int = 12
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling (use greedy decoding for temperature 0)")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("top_p must be in (0, 1] and top_k >= 0")


@dataclass
class Generated:
    """Per prompt: its token ids, the response ids (through the stop token), the response text and the command."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    commands: list[str]


def stop_token_ids(tokenizer) -> set[int]:
    """The token ids that end a reply: EOS and pad."""
    return {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}


def ends_reply(token: int, tokenizer, stop_ids: set[int]) -> bool:
    """Whether a reply stops after `token`: a stop token (EOS/pad) or a token holding a newline."""
    return token in stop_ids or "\n" in tokenizer.decode([token])


def cut_response(ids: list[int], tokenizer, stop_ids: set[int]) -> list[int]:
    """The response up to and including the first token that ends a reply (`ends_reply`)."""
    for i, token in enumerate(ids):
        if ends_reply(token, tokenizer, stop_ids):
            return ids[: i + 1]
    return ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], config: GenerationConfig, **generate_kwargs) -> Generated:
    """Left-padded batched sampling with the KV cache; extra kwargs go to `model.generate` (e.g. synced_gpus)."""
    device = next(model.parameters()).device
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    sampling = {"temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p} if config.do_sample else {}
    output = model.generate(
        **batch,
        max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stop_strings=["\n"],
        tokenizer=tokenizer,
        **sampling,
        **generate_kwargs,
    )
    stop_ids = stop_token_ids(tokenizer)
    width = batch["input_ids"].shape[1]
    prompt_ids = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    response_ids = [cut_response(row[width:].tolist(), tokenizer, stop_ids) for row in output]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in response_ids]
    return Generated(prompt_ids, response_ids, texts, [parse_command(text) for text in texts])
