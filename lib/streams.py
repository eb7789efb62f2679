"""Episode context (`--context episode`): each game slot's conversation in an iteration is one append-only token
stream, read through a KV cache that lives across turns, so that a turn encodes only its new tokens.

A slot's stream (token-in/token-out: these ids are exactly what the policy read, sampled or scored, and what the
update trains on; nothing is re-tokenized from text):
  start     the window prompt of the slot's state (lib.prompts.build_prompt: instruction, goal, examples, the
            episode's last memory_turns turns, the message), ending where the policy answers;
  per turn  the action (the command's tokens as the policy wrote them, or the chosen candidate's answer tokens),
            then the game's segment: what closes the reply when the policy did not end it (the chat template's
            end-of-turn token, a plain transcript's newline), the next message (lib.prompts.current_message:
            observation, inventory, hint) and the header the policy answers after, as the prompt format renders a
            following turn (`StreamFormat`).
A stream starts at the first turn of an episode and at the first turn of each iteration (lib.rollout's collect),
so that its tokens all belong to one iteration's rollout and update (one packed row each); it also restarts when
it plus the next segment plus room for a reply (`reply_room`) would pass max_context_tokens. Every start is the
prompt --context window shows for that state, a function of the episode's history: a resumed run rebuilds it from
the replayed turns. (Keeping streams across iterations, with the earlier tokens as the update's context, cost the
update as many tokens per env step: README, "What the policy reads each turn".)

The KV cache (`StreamCache`) holds each slot's stream; a forward appends a slot's new tokens and returns their
hidden states. A token's position is its index in its stream.

Blocks (score mode): a turn's new tokens are the stream's (block 0) then one block per candidate. A candidate sees
the stream before it and its own earlier tokens, at positions continuing from the stream; the stream never sees a
candidate, and the cache drops candidates after the forward. The update packs a stream's turns the same way
(`pack_stream_segments`): per turn the segment, the candidate blocks, then the chosen action on the stream, so it
computes the rollout's numbers from one forward per stream (tests/test_streams.py).
"""

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lib.generation import GenerationConfig, ends_reply, stop_token_ids
from lib.losses import logprobs_from_logits
from lib.models import cache_argument
from lib.prompts import PromptConfig, Turn, answer_text, build_prompt, clean_observation, current_message, render
from lib.trunk import top_hidden, trunk_hidden

CONTEXTS = ("window", "episode")
_MESSAGE = "<<message-7f3a>>"
_COMMAND = "<<command-7f3a>>"


class StreamFormat:
    """The token pieces of a stream in one prompt format: the start prompt and the segment after an action."""

    def __init__(self, prompt_config: PromptConfig, tokenizer):
        self.config = prompt_config
        self.tokenizer = tokenizer
        # Render a conversation with a placeholder answer and message: what follows the answer is the segment.
        answer = answer_text(_COMMAND, prompt_config, tokenizer)
        text = render("", _MESSAGE, [Turn("(observation)", _COMMAND)], [], prompt_config, tokenizer)
        before, found, after = text.partition(answer)
        if not found or _MESSAGE not in after:
            raise ValueError("the prompt format renders a past answer differently from answer_text: cannot stream it")
        self.segment_template = after
        self.closing = answer[len(_COMMAND):]  # what ends a reply: the end-of-turn token or a newline

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def start_ids(self, state, history: list[Turn]) -> list[int]:
        """The window prompt of `state` after the episode's turns `history` (it shows the last memory_turns) as token
        ids."""
        observation = clean_observation(state.observation, state.objective)
        return self.encode(build_prompt(state.objective, observation, state.inventory, state.admissible_commands,
                                        history, self.config, self.tokenizer))

    def segment_ids(self, response_ids: list[int], state) -> list[int]:
        """The game's tokens after a reply `response_ids`: its closing when the reply lacks one, the message of
        `state`, the answer header."""
        closed = bool(response_ids) and self.tokenizer.decode(response_ids[-1:]).endswith(self.closing)
        message = current_message(clean_observation(state.observation, state.objective), state.inventory,
                                   state.admissible_commands, self.config)
        return self.encode(("" if closed else self.closing) + self.segment_template.replace(_MESSAGE, message))


class SlotStreams:
    """Each slot's stream: its token ids, its number (a new one per start: the update groups turns by it), how
    many of its ids the KV caches hold, and the last reply (whose closing the next segment adds)."""

    def __init__(self, num_slots: int, stream_format: StreamFormat, max_context_tokens: int):
        self.format = stream_format
        self.max_context_tokens = max_context_tokens
        self.ids: list[list[int]] = [[] for _ in range(num_slots)]
        self.numbers = [-1] * num_slots
        self.cached = [0] * num_slots
        self.replies: list[list[int]] = [[] for _ in range(num_slots)]
        self.next_number = 0

    def begin_turn(self, slot: int, state, history: list[Turn], reply_room: int) -> tuple[list[int], bool]:
        """Append the game's tokens for `state` to the slot's stream; (those ids, whether the stream (re)started,
        in which case the caller resets the slot's KV cache rows)."""
        if self.ids[slot]:
            segment = self.format.segment_ids(self.replies[slot], state)
            if len(self.ids[slot]) + len(segment) + reply_room <= self.max_context_tokens:
                self.ids[slot] += segment
                return segment, False
        start = self.format.start_ids(state, history)
        self.ids[slot], self.cached[slot], self.replies[slot] = list(start), 0, []
        self.numbers[slot], self.next_number = self.next_number, self.next_number + 1
        return start, True

    def pending(self, slot: int) -> list[int]:
        """The slot's ids the caches do not hold yet."""
        return self.ids[slot][self.cached[slot]:]

    def add_reply(self, slot: int, response_ids: list[int], cached: int) -> None:
        """The policy's reply joins the stream; the caches now hold `cached` of the stream's ids."""
        self.cached[slot] = cached
        self.ids[slot] += response_ids
        self.replies[slot] = list(response_ids)

    def end(self, slot: int) -> None:
        """The next turn of `slot` starts a new stream."""
        self.ids[slot], self.cached[slot], self.replies[slot] = [], 0, []


def layout(blocks: list[int], start: int) -> list[int]:
    """Positions of a row's tokens, `blocks` their block ids (0: the stream; k > 0: candidate k), the stream
    continuing from position `start` and each candidate from the stream before it."""
    positions, main = [], start
    for index, block in enumerate(blocks):
        if block == 0:
            positions.append(main)
            main += 1
        elif index and blocks[index - 1] == block:
            positions.append(positions[-1] + 1)
        else:  # a candidate's first token
            positions.append(main)
    return positions


def visibility(blocks: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(B, Q, Q) bool: token q sees token k (k <= q, k on the stream (block 0) or in q's block, k not padding;
    every token sees itself, so that no row of the mask is empty)."""
    width = blocks.shape[1]
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]
    same = (blocks[:, None, :] == 0) | (blocks[:, :, None] == blocks[:, None, :])
    return (causal & same & real[:, None, :]) | torch.eye(width, dtype=torch.bool)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (B, Q, K) -> the additive (B, 1, Q, K) attention mask the decoder takes as is."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class StreamCache:
    """One model's KV cache of each slot's stream (module docstring): per slot, per layer, keys and values
    (1, heads, length, head_dim). Slots run one forward each: streams grow by different amounts each turn (a new
    episode's start prompt beside short segments), and padding them to one width would encode more padding than
    tokens."""

    def __init__(self, num_rows: int):
        self.rows: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = [None] * num_rows
        self.lengths = [0] * num_rows

    def reset(self, row: int) -> None:
        self.rows[row], self.lengths[row] = None, 0

    def forward(self, lm, row: int, new_ids: list[int], blocks: list[int] | None = None, keep: bool = True) -> torch.Tensor:
        """Run the decoder of `lm` on slot `row`'s new tokens on top of its cache; their last hidden states (Q, H).
        `blocks`: 0 for the stream's tokens (first), k > 0 for candidate k's (after them). With `keep` the stream's
        tokens stay in the cache; candidates and every token of a peek (keep False) are dropped."""
        blocks = blocks or [0] * len(new_ids)
        inputs = self._inputs(lm, row, blocks, explicit_mask=blocks.count(0) < len(blocks))
        cache = self._cache(row, lm.config)
        decoder = lm.get_decoder()
        output = decoder(input_ids=torch.tensor([new_ids], device=inputs["position_ids"].device), use_cache=True,
                         **inputs, **{cache_argument(decoder): cache})
        self._keep(row, cache, blocks.count(0) if keep else 0)
        return output.last_hidden_state[0]

    def forward_shared(self, policy, reference, reference_cache: "StreamCache", layers: int, row: int,
                       new_ids: list[int], blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` (keep True) of the policy on this cache and of a reference sharing its first `layers` layers
        (lib/trunk.py) on `reference_cache`, running that trunk once: (trunk states, policy's and reference's last
        hidden states), each (Q, H). The reference's cache holds its top layers only."""
        inputs = self._inputs(policy, row, blocks, explicit_mask=True)  # a partial cache knows no past length
        caches = [self._cache(row, policy.config), reference_cache._cache(row, reference.config)]
        trunk = trunk_hidden(policy, layers, torch.tensor([new_ids], device=inputs["position_ids"].device),
                             cache=caches[0], **inputs)
        hidden = [top_hidden(model, layers, trunk, cache=cache, **inputs)[0]
                  for model, cache in zip((policy, reference), caches)]
        for owner, cache in zip((self, reference_cache), caches):
            owner._keep(row, cache, blocks.count(0))
        return trunk[0], hidden[0], hidden[1]

    def _inputs(self, lm, row: int, blocks: list[int], explicit_mask: bool) -> dict:
        """Positions (1, Q) of the new tokens, and their additive mask over cache + new tokens when `explicit_mask`
        (else None: the stream's tokens alone are causal, the decoder's own mask)."""
        main = blocks.count(0)
        if blocks[:main] != [0] * main:
            raise ValueError("a cached forward takes the stream's tokens first, then the candidates")
        device, dtype = next(lm.parameters()).device, next(lm.parameters()).dtype
        past = self.lengths[row]
        mask = None
        if explicit_mask:
            seen = visibility(torch.tensor([blocks]), torch.ones(1, len(blocks), dtype=torch.bool))
            allowed = torch.cat([torch.ones(1, len(blocks), past, dtype=torch.bool), seen], dim=2)
            mask = additive_mask(allowed, dtype).to(device)
        return {"position_ids": torch.tensor([layout(blocks, past)], device=device), "attention_mask": mask}

    def _cache(self, row: int, config) -> DynamicCache:
        return DynamicCache(self.rows[row]) if self.rows[row] is not None else DynamicCache(config=config)

    def _keep(self, row: int, cache: DynamicCache, new: int) -> None:
        """Keep the cache's first past + `new` tokens (the stream's; a layer another model runs stays empty)."""
        kept = self.lengths[row] + new
        self.rows[row] = [(layer.keys[:, :, :kept], layer.values[:, :, :kept]) if layer.is_initialized else (None, None)
                          for layer in cache.layers] if kept else None
        self.lengths[row] = kept


def candidate_turn(lm, cache: StreamCache, pending: list[list[int]], candidate_ids: list[list[list[int]] | None], *,
                   length_normalize: bool, value_head=None, shared: tuple | None = None):
    """Score mode's forward for one turn of each slot with candidates (others: None): its pending stream tokens
    (kept), then its candidates (dropped). Returns per slot its candidates' scores (K,) (None for the others) and
    per slot the value at its last pending token (None without value_head, or for slots without candidates).

    `shared` = (reference, its StreamCache, layers): a reference sharing the first `layers` layers (lib/trunk.py)
    reads the same trunk, and two more lists come back: per slot the reference's scores and the trunk states of
    the forward's tokens (pending, then candidate after candidate)."""
    scores: list[torch.Tensor | None] = [None] * len(pending)
    values: list[torch.Tensor | None] = [None] * len(pending)
    ref_scores: list[torch.Tensor | None] = [None] * len(pending)
    trunks: list[torch.Tensor | None] = [None] * len(pending)
    for row, (ids, candidates) in enumerate(zip(pending, candidate_ids)):
        if candidates is None:
            continue
        new_ids, blocks = list(ids), [0] * len(ids)
        sources, targets, lengths = [], [], []
        for block, answer in enumerate(candidates, start=1):
            # Token t of a candidate is predicted at the last pending token (t = 0) or at its own token t - 1.
            sources += [len(ids) - 1] + list(range(len(new_ids), len(new_ids) + len(answer) - 1))
            targets += answer
            lengths.append(len(answer))
            new_ids += answer
            blocks += [block] * len(answer)
        read = {"targets": torch.tensor(targets), "lengths": lengths, "counts": [len(candidates)]}
        if shared is None:
            hidden = cache.forward(lm, row, new_ids, blocks)
        else:
            reference, reference_cache, layers = shared
            trunks[row], hidden, ref_hidden = cache.forward_shared(lm, reference, reference_cache, layers, row,
                                                                   new_ids, blocks)
            ref_logits = reference.get_output_embeddings()(ref_hidden[torch.tensor(sources, device=ref_hidden.device)])
            ref_scores[row] = candidate_scores(ref_logits, read, length_normalize)[0]
        logits = lm.get_output_embeddings()(hidden[torch.tensor(sources, device=hidden.device)])
        scores[row] = candidate_scores(logits, read, length_normalize)[0]
        if value_head is not None:
            values[row] = value_head(hidden[len(ids) - 1])
    return (scores, values) if shared is None else (scores, values, ref_scores, trunks)


def generate_turn(lm, ref_lm, cache: StreamCache, ref_cache: StreamCache | None, pending: list[list[int]],
                  config: GenerationConfig, tokenizer, value_head=None):
    """Generate mode's turn for each slot with pending tokens (others: []): sample a reply token by token on top
    of its cache, stopping after the first end-of-turn token or token holding a newline (lib.generation.cut_response's
    rule) or at max_new_tokens. Per slot: {response_ids, logprobs (R,) at the sampling temperature, ref_logprobs (R,)
    or None, values (R,) at the positions predicting each token or None}; None for idle slots.

    The caches then hold each slot's pending tokens and its reply but the last token (it joins with the next turn)."""
    temperature = config.temperature if config.do_sample else 1.0
    warpers = LogitsProcessorList()
    if config.do_sample:
        warpers.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            warpers.append(TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(config.top_p))
    stops = stop_token_ids(tokenizer)
    results: list[dict | None] = [None] * len(pending)
    for row, ids in enumerate(pending):
        if not ids:
            continue
        response, logprobs, values, new_ids = [], [], [], list(ids)
        while True:
            state = cache.forward(lm, row, new_ids)[-1]
            logits = lm.get_output_embeddings()(state).float()[None]
            if value_head is not None:
                values.append(value_head(state).float())
            if config.do_sample:
                token = int(torch.multinomial(torch.softmax(warpers(None, logits.clone()), dim=-1).cpu(), 1))
            else:
                token = int(logits.argmax(-1))
            logprobs.append(logprobs_from_logits(logits / temperature, torch.tensor([token], device=logits.device))[0])
            response.append(token)
            new_ids = [token]
            if ends_reply(token, tokenizer, stops) or len(response) >= config.max_new_tokens:
                break
        ref_logprobs = None
        if ref_cache is not None:
            # The reference reads the same tokens in one forward: the pending ones and the reply but its last token.
            hidden = ref_cache.forward(ref_lm, row, list(ids) + response[:-1])[len(ids) - 1:]
            ref_logits = ref_lm.get_output_embeddings()(hidden).float() / temperature
            ref_logprobs = logprobs_from_logits(ref_logits, torch.tensor(response, device=ref_logits.device)).cpu()
        results[row] = {
            "response_ids": response,
            "logprobs": torch.stack(logprobs).cpu(),
            "ref_logprobs": ref_logprobs,
            "values": torch.stack(values).cpu() if value_head is not None else None,
        }
    return results


def pack_stream_segments(segments: list[dict], pad_id: int) -> dict:
    """The update's rows: one per stream, {turns: [{prompt_ids, response_ids, candidate_ids (score mode) or None,
    and with kept trunk states (lib/trunk.py) trunk and chosen_index}]}, laid out as the rollout read them (module
    docstring).

    Returns input_ids, position_ids (B, L), attention_mask (B, 1, L, L) additive (float32; cast by the caller) and
    where the outputs are read, as flat (row, position) pairs: `value_at` (N, 2), one per turn (the last token of
    its prompt); `logits_at` (M, 2) and `targets` (M,): every token the policy produced or scored, in turn order
    (generate: the response tokens; score: every candidate's tokens, candidate after candidate), and `lengths`: per
    turn its response length (generate) or per candidate its length (score) with `counts` per turn; `trunks`:
    per row its trunk states when every turn kept them, else None."""
    rows, all_blocks, value_at, logits_at, targets, lengths, counts = [], [], [], [], [], [], []
    for index, segment in enumerate(segments):
        row, blocks = [], []
        block = 0
        for turn in segment["turns"]:
            row += turn["prompt_ids"]
            blocks += [0] * len(turn["prompt_ids"])
            last = len(row) - 1
            value_at.append((index, last))
            if turn.get("candidate_ids") is not None:
                counts.append(len(turn["candidate_ids"]))
                for answer in turn["candidate_ids"]:
                    block += 1
                    logits_at += [(index, last)] + [(index, p) for p in range(len(row), len(row) + len(answer) - 1)]
                    targets += answer
                    lengths.append(len(answer))
                    row += answer
                    blocks += [block] * len(answer)
            else:
                response = turn["response_ids"]
                logits_at += [(index, last)] + [(index, p) for p in range(len(row), len(row) + len(response) - 1)]
                targets += response
                lengths.append(len(response))
            row += turn["response_ids"]
            blocks += [0] * len(turn["response_ids"])
        rows.append(row)
        all_blocks.append(blocks)
    trunks = None
    if all(turn.get("trunk") is not None for segment in segments for turn in segment["turns"]):
        trunks = [stream_trunk(segment["turns"]) for segment in segments]
        if [len(states) for states in trunks] != list(map(len, rows)):
            raise ValueError("the kept trunk states do not match the streams' tokens")
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    block_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    for index, (row, blocks) in enumerate(zip(rows, all_blocks)):
        input_ids[index, : len(row)] = torch.tensor(row)
        position_ids[index, : len(row)] = torch.tensor(layout(blocks, 0))
        block_ids[index, : len(row)] = torch.tensor(blocks)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": additive_mask(visibility(block_ids, block_ids >= 0), torch.float32),
        "value_at": torch.tensor(value_at),
        "logits_at": torch.tensor(logits_at),
        "targets": torch.tensor(targets),
        "lengths": lengths,
        "counts": counts,
        "tokens": sum(map(len, rows)),
        "trunks": trunks,
    }


def stream_trunk(turns: list[dict]) -> torch.Tensor:
    """A stream's trunk states in its packed row's order, from its score-mode turns' kept ones. A turn's forward
    read the stream's pending tokens (the previous turn's chosen answer, then the segment) and its candidate blocks:
    one after another they are the row but for the last turn's answer, never read on the stream; a candidate block
    sees what that answer on the stream sees, at the same positions, so the chosen block's states stand in."""
    last = turns[-1]
    lengths = list(map(len, last["candidate_ids"]))
    start = len(last["trunk"]) - sum(lengths) + sum(lengths[: last["chosen_index"]])
    answer = last["trunk"][start : start + lengths[last["chosen_index"]]]
    return torch.cat([turn["trunk"] for turn in turns] + [answer])


def stream_outputs(lm, packed: dict, value_head=None, values_at: str = "value_at", trunk_layers: int = 0):
    """(logits (M, V) at packed['logits_at'], values at packed[values_at] or None) from one decoder forward of the
    packed rows; differentiable. Score mode reads a value per turn (`value_at`), generate mode one per response
    token (`logits_at`: the positions predicting them). With `trunk_layers`, the forward starts from the rows' kept
    trunk states (packed['trunks']) at that layer."""
    device = next(lm.parameters()).device
    dtype = next(lm.parameters()).dtype
    inputs = {"attention_mask": packed["attention_mask"].to(device, dtype),
              "position_ids": packed["position_ids"].to(device)}
    if trunk_layers:
        trunks = torch.nn.utils.rnn.pad_sequence([states.to(device, dtype) for states in packed["trunks"]],
                                                 batch_first=True)
        hidden = top_hidden(lm, trunk_layers, trunks, **inputs)
    else:
        hidden = lm.get_decoder()(input_ids=packed["input_ids"].to(device), use_cache=False, **inputs).last_hidden_state
    at = packed["logits_at"].to(device)
    logits = lm.get_output_embeddings()(hidden[at[:, 0], at[:, 1]])
    if value_head is None:
        return logits, None
    value_at = packed[values_at].to(device)
    return logits, value_head(hidden[value_at[:, 0], value_at[:, 1]])


class EpisodeContext:
    """What a player keeps per slot with --context episode: the streams and the KV caches of the policy (and of the
    reference, for a collector). A stream's start or end resets the slot's caches."""

    def __init__(self, num_slots: int, prompt_config: PromptConfig, tokenizer, max_context_tokens: int,
                 with_reference: bool = False):
        self.streams = SlotStreams(num_slots, StreamFormat(prompt_config, tokenizer), max_context_tokens)
        self.cache = StreamCache(num_slots)
        self.ref_cache = StreamCache(num_slots) if with_reference else None

    def caches(self) -> list[StreamCache]:
        return [self.cache] + ([self.ref_cache] if self.ref_cache is not None else [])

    def begin(self, slot: int, state, history: list[Turn], reply_room: int) -> list[int]:
        """The game's new tokens for this turn of `slot` (SlotStreams.begin_turn)."""
        ids, restarted = self.streams.begin_turn(slot, state, history, reply_room)
        if restarted:
            for cache in self.caches():
                cache.reset(slot)
        return ids

    def pending(self, slots: list[int]) -> list[list[int]]:
        """Per slot (all of them) the stream tokens the caches lack; [] for slots not in `slots`."""
        chosen = set(slots)
        return [self.streams.pending(slot) if slot in chosen else [] for slot in range(len(self.streams.ids))]

    def end(self, slot: int) -> None:
        self.streams.end(slot)
        for cache in self.caches():
            cache.reset(slot)

    def peek_value(self, model, slot: int, state) -> float:
        """The value of `state` read as the next turn of the slot's stream (its pending tokens, then the state's
        segment) without changing the stream; `model` is a PolicyWithValue."""
        new_ids = self.streams.pending(slot) + self.streams.format.segment_ids(self.streams.replies[slot], state)
        hidden = self.cache.forward(model.policy, slot, new_ids, keep=False)
        return float(model.value_head(hidden[-1]))


def candidate_scores(logits: torch.Tensor, packed: dict, length_normalize: bool) -> list[torch.Tensor]:
    """Score mode: the logits (M, V) predicting packed['targets'] (every candidate's tokens, candidate after
    candidate, `lengths` each, `counts` candidates per turn) -> per turn its candidates' scores (K,)."""
    token_logprobs = logprobs_from_logits(logits.float(), packed["targets"].to(logits.device))
    lengths = torch.tensor(packed["lengths"], device=logits.device)
    scores = torch.stack([part.sum() for part in token_logprobs.split(packed["lengths"])])
    if length_normalize:
        scores = scores / lengths
    return list(scores.split(packed["counts"]))


def per_turn(flat: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    """Generate mode: rows of `flat` (M, ...), the turns' response tokens one turn after another (`lengths` each),
    as (N, width, ...) right-padded with zeros; differentiable."""
    place = torch.cat([turn * width + torch.arange(length) for turn, length in enumerate(lengths)]).to(flat.device)
    out = flat.new_zeros((len(lengths) * width, *flat.shape[1:]))
    return out.index_copy(0, place, flat).view(len(lengths), width, *flat.shape[1:])
