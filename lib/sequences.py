"""Prompt + response token rows as model inputs, and what a model says at the response positions.

Positions. A row is its prompt p (P tokens) followed by its response r (R tokens). Response token j is predicted
from position P-1+j, so with the rows packed by `pack_sequences` (prompts left-padded to a common width, responses
right-padded), the outputs at positions start..end-1 predict response tokens 0..T-1 of every row:
  logprobs[j] = log pi(r_j | p, r_<j)        values[j] = value head at P-1+j (values[0]: the prompt's last token,
                                                          the value of the turn's state)
"""

import torch

from lib.losses import logprobs_from_logits


def pack_sequences(
    prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, response_width: int | None = None
) -> dict:
    """Model inputs for prompt+response rows: [left pad][prompt][response][right pad].

    Returns input_ids, attention_mask, position_ids (B, L); response_ids, response_mask (B, T) with
    T = response_width or the longest response (at least 1, so that an empty response still reads the value at
    its prompt's last token); and start, end: the positions whose outputs predict response tokens 0..T-1.
    """
    prompt_width = max(len(ids) for ids in prompt_ids)
    width = response_width or max(1, max(len(ids) for ids in response_ids))
    rows, masks, responses, response_masks = [], [], [], []
    for prompt, response in zip(prompt_ids, response_ids):
        left, right = prompt_width - len(prompt), width - len(response)
        rows.append([pad_id] * left + prompt + response + [pad_id] * right)
        masks.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
        responses.append(response + [pad_id] * right)
        response_masks.append([1] * len(response) + [0] * right)
    attention_mask = torch.tensor(masks)
    # Positions count real tokens only, as generate() does for left-padded prompts.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": torch.tensor(rows),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_ids": torch.tensor(responses),
        "response_mask": torch.tensor(response_masks, dtype=torch.bool),
        "start": prompt_width - 1,
        "end": prompt_width - 1 + width,
    }


def model_inputs(packed: dict, device) -> list[torch.Tensor]:
    """input_ids, attention_mask, position_ids of `pack_sequences` rows on `device`."""
    return [packed[key].to(device) for key in ("input_ids", "attention_mask", "position_ids")]


def response_logits(model, input_ids, attention_mask, position_ids, start: int, end: int) -> torch.Tensor:
    """A plain LM's logits at positions start..end-1 only (the reference model, rejection sampling's policy).

    One call of the whole model (`logits_to_keep` keeps the tail), so that `model` may also be a DeepSpeed engine:
    ZeRO-3 gathers weights in hooks that expect the forward to enter at the top module.
    """
    keep = input_ids.shape[1] - start
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep,
                   use_cache=False).logits
    return logits[:, : end - start]


@torch.no_grad()
def score_sequences(model, ref_model, prompt_ids, response_ids, pad_id: int, temperature: float = 1.0) -> dict:
    """Behaviour log-probs, reference log-probs (None without ref_model) and values (None without a value head) per
    response token, (B, T) on the CPU; `model` is a lib.value_head.PolicyWithValue."""
    device = next(model.parameters()).device
    packed = pack_sequences(prompt_ids, response_ids, pad_id)
    inputs = model_inputs(packed, device)
    labels = packed["response_ids"].to(device)
    logits, values = model(*inputs, packed["start"], packed["end"])
    scored = {
        "logprobs": logprobs_from_logits(logits.float() / temperature, labels),
        "values": None if values is None else values.float(),
        "mask": packed["response_mask"],
        "ref_logprobs": None,
    }
    if ref_model is not None:
        ref_logits = response_logits(ref_model, *inputs, packed["start"], packed["end"])
        scored["ref_logprobs"] = logprobs_from_logits(ref_logits.float() / temperature, labels)
    return {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in scored.items()}
