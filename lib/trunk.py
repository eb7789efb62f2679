"""The frozen trunk the policy and its reference share, run once per token.

PPO trains the last --trainable_layers_fraction of the decoder (lib.models.freeze_lower_layers: by default the top
10 of SmolLM2-135M's 30 layers); the embeddings and the layers below never move. The reference is a frozen copy of
the starting policy, so up to the first trainable layer both compute the same hidden states: the trunk.
`share_trunk` makes the reference's trunk layers the policy's own modules (one copy in memory, and the sharing is
then structural: `shared_layers` counts it), after checking on a probe that running the decoder in two parts
(`trunk_hidden`, then `top_hidden` from its output) gives the model's own forward for this architecture.

Then, per token:
  rollout  the trunk once; its output feeds the policy's top layers and the reference's (instead of two whole
           forwards), and is kept with the turn (`Transition.trunk`, the trunk states of its tokens);
  update   each of the ppo_epochs forwards starts from the kept trunk states at the first trainable layer, so it
           encodes the top layers only (backward never went below them).
With the defaults (20 of 30 layers shared, 2 epochs) a token costs 20 + 2 x 10 + 2 x (10 + 2 x 10) = 100 layer
passes instead of 30 + 30 + 2 x (30 + 2 x 10) = 160 (a backward pass counted as two forwards). The kept states cost
hidden_size x 4 bytes per token of the iteration's rollout (2.3 KB for SmolLM2-135M: 35 MB at the quick start).

The two parts run the decoder's own forward with its stack of layers cut (`layers_between`), so rotary positions,
masks and caches stay the model's; the callers give explicit 4-D masks and positions, since a cache that holds
only some layers' keys does not know the sequence's length. A cache layer belongs to the model whose attention
module has its index: the policy's cache holds trunk and top layers, the reference's its top layers only.
"""

import contextlib

import torch
from torch import nn

from lib.models import cache_argument, decoder_layers, final_norm


def shared_layers(policy: nn.Module, reference: nn.Module | None) -> int:
    """How many bottom decoder layers `reference` takes from `policy` (0: none, or no reference)."""
    if reference is None or not isinstance(reference, nn.Module) or hasattr(reference, "module"):
        return 0  # a DeepSpeed engine (ZeRO-3) keeps its own partitioned weights
    count = 0
    for mine, theirs in zip(decoder_layers(policy), decoder_layers(reference)):
        if mine is not theirs:
            break
        count += 1
    return count


def frozen_bottom_layers(policy: nn.Module) -> int:
    """How many bottom decoder layers of `policy` train nothing, when its input embeddings train nothing either."""
    if policy.get_input_embeddings().weight.requires_grad:
        return 0
    count = 0
    for layer in decoder_layers(policy):
        if any(p.requires_grad for p in layer.parameters()):
            break
        count += 1
    return count


def share_trunk(policy: nn.Module, reference: nn.Module | None) -> int:
    """Give `reference` the policy's frozen bottom layers (module docstring) when both are plain modules of one
    device and dtype with equal trunk weights and the two-part forward reproduces the model's; returns how many
    layers it shares (0: it shares none, and the callers run two whole models as before)."""
    if reference is None or hasattr(reference, "module"):
        return 0
    count = frozen_bottom_layers(policy)
    mine, theirs = decoder_layers(policy), decoder_layers(reference)
    if not 0 < count < len(mine) or len(mine) != len(theirs):
        return 0
    first, other = next(policy.parameters()), next(reference.parameters())
    if (first.device, first.dtype) != (other.device, other.dtype):
        return 0
    for layer, copy in zip(mine[:count], theirs[:count]):
        if any(not torch.equal(a, b) for a, b in zip(layer.state_dict().values(), copy.state_dict().values())):
            return 0
    if not splits_exactly(policy, count):
        return 0
    for index in range(count):
        theirs[index] = mine[index]
    return count


@contextlib.contextmanager
def layers_between(lm: nn.Module, start: int, stop: int, norm: bool):
    """Within the block, the decoder of `lm` runs its layers start..stop-1 only, then its final norm if `norm`: its
    forward maps the hidden states entering layer `start` (inputs_embeds; or the token ids when start is 0) to
    those leaving layer stop-1."""
    decoder = lm.get_decoder()
    layers = decoder_layers(lm)
    name = next(key for key, module in decoder.named_children() if module is layers)
    final = final_norm(decoder)
    norm_name = next(key for key, module in decoder.named_children() if module is final)
    setattr(decoder, name, nn.ModuleList(list(layers)[start:stop]))
    if not norm:
        setattr(decoder, norm_name, nn.Identity())
    try:
        yield decoder
    finally:
        setattr(decoder, name, layers)
        setattr(decoder, norm_name, final)


def trunk_hidden(lm: nn.Module, layers: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, cache=None) -> torch.Tensor:
    """The hidden states entering layer `layers` (B, L, H): the embeddings, then layers 0..layers-1."""
    with layers_between(lm, 0, layers, norm=False) as decoder:
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=cache is not None, **_cache_keyword(decoder, cache)).last_hidden_state


def top_hidden(lm: nn.Module, layers: int, trunk: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor, cache=None) -> torch.Tensor:
    """The decoder's last hidden states (after its final norm) from the trunk states entering layer `layers`."""
    with layers_between(lm, layers, len(decoder_layers(lm)), norm=True) as decoder:
        return decoder(inputs_embeds=trunk, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=cache is not None, **_cache_keyword(decoder, cache)).last_hidden_state


def _cache_keyword(decoder, cache) -> dict:
    return {} if cache is None else {cache_argument(decoder): cache}


def causal_mask(keys_mask: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive (B, 1, Q, K) mask of Q new tokens at the end of K (2-D `keys_mask` (B, K): 1 for a real token):
    a query sees the real keys up to itself, and itself (so that a padding query's row is never empty)."""
    width = keys_mask.shape[1]
    query_at = torch.arange(width - queries, width, device=keys_mask.device)
    key_at = torch.arange(width, device=keys_mask.device)
    allowed = (key_at[None, :] <= query_at[:, None])[None] & keys_mask[:, None, :].bool()
    allowed |= key_at[None, None, :] == query_at[None, :, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=keys_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


@torch.no_grad()
def splits_exactly(lm: nn.Module, layers: int) -> bool:
    """Whether the two-part forward of `lm` (trunk_hidden, then top_hidden) gives its decoder's own last hidden
    states on a probe. An architecture that treats inputs_embeds differently from the embeddings it computes (e.g.
    one that scales them) fails it."""
    device, dtype = next(lm.parameters()).device, next(lm.parameters()).dtype
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, lm.get_input_embeddings().num_embeddings, (2, 12), generator=generator).to(device)
    keys_mask = torch.ones(2, 12, dtype=torch.long, device=device)
    keys_mask[1, :3] = 0  # a left-padded row
    position_ids = (keys_mask.cumsum(-1) - 1).clamp(min=0)
    mask = causal_mask(keys_mask, 12, dtype)
    whole = lm.get_decoder()(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
    parts = top_hidden(lm, layers, trunk_hidden(lm, layers, input_ids, mask, position_ids), mask, position_ids)
    real = keys_mask.bool()
    scale = whole[real].abs().max().clamp(min=1e-6)
    return bool(((parts - whole)[real].abs().max() / scale) < 1e-3)
