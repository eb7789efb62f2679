"""Admissible-command scoring: a policy over the commands the game accepts instead of free text (as in GLAM, TWOSOME).

A candidate command's score is log pi(answer | prompt), the log-probability of the tokens the policy would write to
give it (`lib.prompts.answer_text`: the command, then the end-of-reply token), summed over those tokens, or their
mean with `length_normalize` (so that long commands are not penalised for their length alone). The policy's
distribution over a state's candidates is softmax(scores / temperature).

Efficient scoring, two forwards for a whole batch of states whatever the number of candidates:
  1. the prompts, LEFT-padded to a common width P with positions counting real tokens only (as `generate` does), in
     one forward that keeps its KV cache (a transformers DynamicCache) and the logits at the last column, which
     with left padding is every prompt's last token: they give each candidate's first token;
  2. the cache rows repeated per candidate (index_select on the batch dimension: candidate c reads the keys and
     values of its state's prompt), then every candidate of every state, right-padded to T tokens, in one forward
     on top of that cache: positions continue from the prompt's length, the attention mask is the prompt's mask
     followed by the candidate's, and the logits at candidate tokens 0..T-2 give tokens 1..T-1.
The prompt is encoded once per state, never per candidate; `candidate_logprobs_naive` encodes prompt + candidate
from scratch for every candidate, the reference the tests and bench/bench_scoring.py compare against.
`candidate_logprobs_packed` gives the same scores from one forward over one row per state (its prompt, then its
candidates behind a block attention mask): without the per-candidate copies of the prompt's keys and values, it is
what a gradient pass (PPO's update) uses. With a value
head (PPO in score mode), the prompt forward runs the decoder and applies the LM head and the value head to the last
column only, so the state's value comes from the same forward as the candidates' first tokens.

Candidate cap (`max_candidates`): over the cap, the first `max_candidates` commands of lib.prompts.by_priority are
kept (verbs in turn, each verb's commands by how many of their words the state's text mentions, then shortest; the
verbs that only look around last), in the game's order. Measured on the gold paths of `sciworld-easy` (262 states over
a cap of 32): the gold command is kept in 157 (keeping the list's first 32 commands, as this cap used to: 61).
"""

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from lib.losses import logprobs_from_logits, masked_sum
from lib.models import cache_argument
from lib.prompts import PromptConfig, answer_text, by_priority
from lib.trunk import causal_mask, top_hidden, trunk_hidden

ACTION_MODES = ("generate", "score")


@dataclass
class ScoringConfig:
    """How a command is chosen in score mode: the candidate cap, sum or mean of token log-probs, greedy or sampled."""

    max_candidates: int = 32
    length_normalize: bool = False
    do_sample: bool = False  # greedy: the best-scoring candidate
    temperature: float = 1.0
    # Choose among the commands the episode played least often at this place (lib.agents.played_at; the untried ones
    # while there are): the game is deterministic, so a repeat learns nothing new, and a greedy policy otherwise loops.
    least_tried: bool = False

    def __post_init__(self):
        if self.max_candidates < 1:
            raise ValueError("max_candidates must be at least 1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling (use greedy choice for temperature 0)")


def select_candidates(commands: list[str], max_candidates: int, *, context: str = "") -> list[str]:
    """The commands to score, at most `max_candidates`, in their original order (rule: the module docstring,
    lib.prompts.by_priority); `context` is the state's text whose words make a command relevant."""
    if len(commands) <= max_candidates:
        return list(commands)
    kept = set(by_priority(commands, context=context)[:max_candidates])
    return [command for command in commands if command in kept]


def encode_candidates(candidates: list[list[str]], prompt_config: PromptConfig, tokenizer) -> list[list[list[int]]]:
    """Per state, per candidate: the token ids of its answer (the command and the end-of-reply token)."""
    return [
        [tokenizer(answer_text(c, prompt_config, tokenizer), add_special_tokens=False)["input_ids"] for c in commands]
        for commands in candidates
    ]


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids, mask = [], []
    for row in rows:
        padding = width - len(row)
        ids.append([pad_id] * padding + row if left else row + [pad_id] * padding)
        mask.append([0] * padding + [1] * len(row) if left else [1] * len(row) + [0] * padding)
    return torch.tensor(ids), torch.tensor(mask)


def _flatten(prompt_ids: list[list[int]], candidate_ids: list[list[list[int]]], pad_id: int, device) -> dict:
    """All candidates as rows: state (C,) the state each belongs to; prompts (S, P) left-padded; candidates (C, T)
    right-padded."""
    if len(prompt_ids) != len(candidate_ids) or any(not rows for rows in candidate_ids):
        raise ValueError("every prompt needs at least one candidate")
    prompts, prompt_mask = _pad(prompt_ids, pad_id, left=True)
    candidates, candidate_mask = _pad([ids for rows in candidate_ids for ids in rows], pad_id, left=False)
    state = torch.tensor([s for s, rows in enumerate(candidate_ids) for _ in rows])
    return {
        "state": state.to(device),
        "prompts": prompts.to(device),
        "prompt_mask": prompt_mask.to(device),
        "candidates": candidates.to(device),
        "candidate_mask": candidate_mask.to(device),
        "counts": [len(rows) for rows in candidate_ids],
    }


def _scores(logits: torch.Tensor, batch: dict, length_normalize: bool) -> list[torch.Tensor]:
    """Logits predicting each candidate token (C, T, V) -> per state, its candidates' scores (K_s,)."""
    mask = batch["candidate_mask"]
    scores = masked_sum(logprobs_from_logits(logits.float(), batch["candidates"]), mask, dim=-1)
    if length_normalize:
        scores = scores / mask.sum(-1)
    return list(scores.split(batch["counts"]))


def candidate_logprobs(
    model, prompt_ids: list[list[int]], candidate_ids: list[list[list[int]]], pad_id: int, length_normalize: bool = False,
    value_head=None,
):
    """Per state, the scores of its candidates (K_s,), with the prompt's KV cache shared by its candidates.

    Two forwards (see the module docstring), whatever the number of states and candidates. Differentiable: call it
    under torch.no_grad() when only acting. With `value_head` (hidden (..., H) -> value (...)), returns
    (scores, values (S,)): each state's value at its prompt's last token, from the prompt forward.
    """
    batch = _flatten(prompt_ids, candidate_ids, pad_id, next(model.parameters()).device)
    prompt_mask, candidate_mask = batch["prompt_mask"], batch["candidate_mask"]
    cache = DynamicCache(config=getattr(model, "module", model).config)
    cache_keyword = {cache_argument(model): cache}
    prompt_inputs = {"input_ids": batch["prompts"], "attention_mask": prompt_mask,
                     "position_ids": (prompt_mask.cumsum(-1) - 1).clamp(min=0), "use_cache": True}
    if value_head is None:
        prompt_logits = model(**prompt_inputs, logits_to_keep=1, **cache_keyword).logits[:, -1]
    else:
        decoder = model.get_decoder()
        hidden = decoder(**prompt_inputs, **{cache_argument(decoder): cache}).last_hidden_state[:, -1]
        prompt_logits, values = model.get_output_embeddings()(hidden), value_head(hidden)
    cache.reorder_cache(batch["state"])  # index_select on the batch dimension: one copy of the prompt per candidate
    width = candidate_mask.shape[1]
    positions = prompt_mask.sum(-1)[batch["state"], None] + torch.arange(width, device=candidate_mask.device)
    candidate_logits = model(
        input_ids=batch["candidates"], attention_mask=torch.cat([prompt_mask[batch["state"]], candidate_mask], dim=1),
        position_ids=positions, use_cache=True, **cache_keyword,
        # The last token's logits would predict past the candidate.
        logits_to_keep=torch.arange(width - 1, device=candidate_mask.device),
    ).logits
    logits = torch.cat([prompt_logits[batch["state"], None], candidate_logits], dim=1)
    scores = _scores(logits, batch, length_normalize)
    return scores if value_head is None else (scores, values)


@torch.no_grad()
def candidate_logprobs_shared(
    policy, reference, layers: int, prompt_ids: list[list[int]], candidate_ids: list[list[list[int]]], pad_id: int,
    length_normalize: bool = False, value_head=None,
) -> dict:
    """`candidate_logprobs` of the policy (with its values) and of a reference that shares its first `layers`
    decoder layers (lib/trunk.py), in the same two cached forwards, each running that trunk once for both.

    Returns scores and ref_scores (per state (K_s,)), values (S,) or None, and trunks: per state the trunk states of
    its prompt's tokens then of its candidates' one after another (L_s, H), the row `candidate_logprobs_packed`
    lays out, for the update to start from."""
    batch = _flatten(prompt_ids, candidate_ids, pad_id, next(policy.parameters()).device)
    dtype = next(policy.parameters()).dtype
    prompt_mask, candidate_mask = batch["prompt_mask"], batch["candidate_mask"]
    caches = [DynamicCache(config=policy.config), DynamicCache(config=reference.config)]
    # Explicit 4-D masks: a cache holding some layers only would tell the decoder a wrong past length.
    prompt_inputs = {"attention_mask": causal_mask(prompt_mask, prompt_mask.shape[1], dtype),
                     "position_ids": (prompt_mask.cumsum(-1) - 1).clamp(min=0)}
    prompt_trunk = trunk_hidden(policy, layers, batch["prompts"], cache=caches[0], **prompt_inputs)
    prompt_last = [top_hidden(model, layers, prompt_trunk, cache=cache, **prompt_inputs)[:, -1]
                   for model, cache in zip((policy, reference), caches)]
    for cache in caches:
        cache.reorder_cache(batch["state"])  # one copy of the prompt per candidate
    width = candidate_mask.shape[1]
    candidate_inputs = {
        "attention_mask": causal_mask(torch.cat([prompt_mask[batch["state"]], candidate_mask], dim=1), width, dtype),
        "position_ids": prompt_mask.sum(-1)[batch["state"], None] + torch.arange(width, device=candidate_mask.device),
    }
    candidate_trunk = trunk_hidden(policy, layers, batch["candidates"], cache=caches[0], **candidate_inputs)
    scored = {}
    for name, model, cache, last in zip(("scores", "ref_scores"), (policy, reference), caches, prompt_last):
        # The last token's output would predict past the candidate.
        hidden = top_hidden(model, layers, candidate_trunk, cache=cache, **candidate_inputs)[:, :-1]
        logits = model.get_output_embeddings()(torch.cat([last[batch["state"], None], hidden], dim=1))
        scored[name] = _scores(logits, batch, length_normalize)
    scored["values"] = None if value_head is None else value_head(prompt_last[0])
    counts, lengths = batch["counts"], candidate_mask.sum(-1).tolist()
    first = [sum(counts[:state]) for state in range(len(counts))]
    scored["trunks"] = [
        torch.cat([prompt_trunk[state, prompt_trunk.shape[1] - len(prompt):]]
                  + [candidate_trunk[c, : lengths[c]] for c in range(first[state], first[state] + counts[state])])
        for state, prompt in enumerate(prompt_ids)
    ]
    return scored


def candidate_logprobs_packed(
    model, prompt_ids: list[list[int]], candidate_ids: list[list[list[int]]], pad_id: int, length_normalize: bool = False,
    value_head=None, trunks: list[torch.Tensor] | None = None, trunk_layers: int = 0,
):
    """The same scores (and values) as `candidate_logprobs`, from one forward over one row per state: its prompt, then
    all its candidates one after another, each candidate attending to the prompt and to its own earlier tokens only
    (a block attention mask), its positions continuing from the prompt's length.

    The prompt's keys and values exist once per state here, not once per candidate: what a gradient pass keeps for
    backward grows with the tokens, not with candidates x prompt length (PPO's update uses this one; acting, without
    gradient, uses the faster cached one). With `trunks` (per state its row's trunk states entering layer
    `trunk_layers`, as `candidate_logprobs_shared` kept them) the forward runs the layers from there up only.
    """
    device = next(model.parameters()).device
    rows, positions, blocks, sources, last = [], [], [], [], []
    for state, (prompt, candidates) in enumerate(zip(prompt_ids, candidate_ids)):
        if not candidates:
            raise ValueError("every prompt needs at least one candidate")
        row, position, block = list(prompt), list(range(len(prompt))), [0] * len(prompt)
        last.append(len(prompt) - 1)
        for index, candidate in enumerate(candidates, start=1):
            # Token t of the candidate is predicted at the prompt's last token (t = 0) or at its own token t - 1.
            sources.append((state, [len(prompt) - 1] + list(range(len(row), len(row) + len(candidate) - 1))))
            row += candidate
            position += range(len(prompt), len(prompt) + len(candidate))
            block += [index] * len(candidate)
        rows.append(row)
        positions.append(position)
        blocks.append(block)
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], device=device)
    position_ids = torch.tensor([p + [0] * (width - len(p)) for p in positions], device=device)
    block_ids = torch.tensor([b + [-1] * (width - len(b)) for b in blocks], device=device)  # -1: padding
    index = torch.arange(width, device=device)
    causal = index[None, :] <= index[:, None]
    # A query sees earlier keys of its own block (padding only padding: no row is fully masked) and the prompt.
    allowed = causal & ((block_ids[:, :, None] == block_ids[:, None, :]) | (block_ids[:, None, :] == 0))
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    if trunks is None:
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=mask[:, None], position_ids=position_ids,
                                     use_cache=False).last_hidden_state
    else:
        if [len(states_) for states_ in trunks] != list(map(len, rows)):
            raise ValueError("the kept trunk states do not match the rows' tokens")
        embeds = torch.nn.utils.rnn.pad_sequence([states_.to(device, dtype) for states_ in trunks], batch_first=True)
        hidden = top_hidden(model, trunk_layers, embeds, mask[:, None], position_ids)
    states = torch.tensor([state for state, _ in sources], device=device)
    source_index, _ = _pad([positions_ for _, positions_ in sources], 0, left=False)
    gathered = hidden[states[:, None], source_index.to(device)]  # (C, T, H): the positions predicting each token
    logits = model.get_output_embeddings()(gathered)
    candidates, candidate_mask = _pad([ids for rows_ in candidate_ids for ids in rows_], pad_id, left=False)
    batch = {"candidates": candidates.to(device), "candidate_mask": candidate_mask.to(device),
             "counts": [len(rows_) for rows_ in candidate_ids]}
    scores = _scores(logits, batch, length_normalize)
    if value_head is None:
        return scores
    return scores, value_head(hidden[torch.arange(len(rows), device=device), torch.tensor(last, device=device)])


def candidate_logprobs_naive(
    model, prompt_ids: list[list[int]], candidate_ids: list[list[list[int]]], pad_id: int, length_normalize: bool = False
) -> list[torch.Tensor]:
    """The same scores as `candidate_logprobs`, from one forward over prompt + candidate for every candidate."""
    batch = _flatten(prompt_ids, candidate_ids, pad_id, next(model.parameters()).device)
    width_prompt, width = batch["prompts"].shape[1], batch["candidates"].shape[1]
    mask = torch.cat([batch["prompt_mask"][batch["state"]], batch["candidate_mask"]], dim=1)
    logits = model(
        input_ids=torch.cat([batch["prompts"][batch["state"]], batch["candidates"]], dim=1), attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False,
        logits_to_keep=torch.arange(width_prompt - 1, width_prompt - 1 + width, device=mask.device),
    ).logits
    return _scores(logits, batch, length_normalize)


def policy_logprobs(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(scores / temperature): the policy's log-probabilities over one state's candidates."""
    return torch.log_softmax(scores.float() / temperature, dim=-1)


def choose_candidate(
    scores: torch.Tensor, do_sample: bool, temperature: float = 1.0, generator: torch.Generator | None = None
) -> int:
    """The index of the chosen candidate: the best score, or a sample from softmax(scores / temperature)."""
    if not do_sample:
        return int(scores.argmax())
    probabilities = policy_logprobs(scores, temperature).exp()
    return int(torch.multinomial(probabilities.cpu(), 1, generator=generator))


def score_candidates(model, ref_model, prompt_ids: list[list[int]], candidate_ids: list[list[list[int]]], pad_id: int,
                     length_normalize: bool, temperature: float, *, trunk_layers: int = 0,
                     trunks: list[torch.Tensor] | None = None) -> dict:
    """The policy over each state's candidates: logprobs (S, K) = log softmax(scores / temperature) over its K_s
    candidates (0 in the padding), mask (S, K), values (S,) at the prompts' last tokens from the same forward (None
    without a value head), and ref_logprobs (S, K) under `ref_model` (None without it, always computed without
    gradient). `model` is a lib.value_head.PolicyWithValue (wrapped or not); differentiable through it.

    With `trunk_layers` (a reference sharing that many layers, lib/trunk.py): acting (no `trunks`, no gradient), both
    read one trunk and `trunks` comes back with the states kept; updating, the kept `trunks` of the states are where
    the forwards start."""
    kept_trunks = None
    if trunk_layers and trunks is None and ref_model is not None and not torch.is_grad_enabled():
        shared = candidate_logprobs_shared(model.policy, ref_model, trunk_layers, prompt_ids, candidate_ids, pad_id,
                                           length_normalize, model.value_head)
        scores, values, ref_scores, kept_trunks = shared["scores"], shared["values"], shared["ref_scores"], shared["trunks"]
    else:
        kept = {} if trunks is None else {"trunks": trunks, "trunk_layers": trunk_layers}
        scores, values = model(candidates={"prompt_ids": prompt_ids, "candidate_ids": candidate_ids, "pad_id": pad_id,
                                           "length_normalize": length_normalize, **kept})
        ref_scores = None
        if ref_model is not None:
            with torch.no_grad():
                ref_scores = (candidate_logprobs(ref_model, prompt_ids, candidate_ids, pad_id, length_normalize)
                              if trunks is None else candidate_logprobs_packed(ref_model, prompt_ids, candidate_ids,
                                                                               pad_id, length_normalize, **kept))
    return {"logprobs": pad_rows([policy_logprobs(s, temperature) for s in scores]),
            "mask": pad_rows([torch.ones(len(s), dtype=torch.bool, device=s.device) for s in scores]),
            "values": None if values is None else values.float(),
            "ref_logprobs": None if ref_scores is None else pad_rows([policy_logprobs(s, temperature) for s in ref_scores]),
            "trunks": kept_trunks}


def pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """1-d tensors of different lengths as one right-padded (zeros) 2-d tensor."""
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
