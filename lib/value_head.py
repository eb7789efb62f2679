"""The value head and the policy-with-value module that PPO trains.

The value head maps the policy's last hidden state (after the final norm) at every position to a scalar: a linear
layer, or a 2-layer MLP. It lives in its own file, `value_head.safetensors`, beside the policy's weights, with its
settings in the file's metadata, so a saved policy stays a plain causal LM that any script can load.

`PolicyWithValue` wraps the LM and the head in ONE module so that DeepSpeed (or DDP) prepares one model with one
optimizer. Its forward runs the decoder once and applies the LM head and the value head only to the positions asked
for (the response positions), since full-sequence logits are the biggest tensor of a PPO step.
"""

import json
from pathlib import Path

import torch
from torch import nn

from lib.scoring import candidate_logprobs, candidate_logprobs_packed
from lib.streams import stream_outputs

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_TYPES = ("linear", "mlp")


class ValueHead(nn.Module):
    """hidden (..., H) -> value (...). `detach_input` stops the value loss from moving the LM under it.

    The output layer starts at zero, so every value starts at 0 instead of at a random offset the policy would
    first have to unlearn through noisy advantages.
    """

    def __init__(self, hidden_size: int, head_type: str = "linear", mlp_hidden_size: int = 0, detach_input: bool = False):
        super().__init__()
        if head_type not in VALUE_HEAD_TYPES:
            raise ValueError(f"unknown value head type {head_type!r}; choose one of {', '.join(VALUE_HEAD_TYPES)}")
        self.hidden_size = hidden_size
        self.head_type = head_type
        self.mlp_hidden_size = mlp_hidden_size or hidden_size
        self.detach_input = detach_input
        if head_type == "linear":
            self.net = nn.Linear(hidden_size, 1)
        else:
            self.net = nn.Sequential(
                nn.Linear(hidden_size, self.mlp_hidden_size), nn.GELU(), nn.Linear(self.mlp_hidden_size, 1)
            )
        output = self.net if head_type == "linear" else self.net[-1]
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.detach_input:
            hidden = hidden.detach()
        weight = next(self.net.parameters())
        return self.net(hidden.to(weight.dtype)).squeeze(-1)

    def config(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "head_type": self.head_type,
            "mlp_hidden_size": self.mlp_hidden_size,
            "detach_input": self.detach_input,
        }


def save_value_head(head: ValueHead, folder: str | Path, state_dict: dict | None = None) -> Path:
    """Write `folder/value_head.safetensors`; `state_dict` for weights gathered under ZeRO-3."""
    from safetensors.torch import save_file

    state_dict = head.state_dict() if state_dict is None else state_dict
    tensors = {name: tensor.detach().float().cpu().contiguous() for name, tensor in state_dict.items()}
    path = Path(folder) / VALUE_HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"config": json.dumps(head.config())})
    return path


def load_value_head(folder: str | Path) -> ValueHead:
    """The head saved by `save_value_head` in `folder` (its settings come from the file's metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / VALUE_HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {VALUE_HEAD_FILE} in {folder}: it was not saved by ppo_textworld.py")
    with safe_open(str(path), framework="pt") as handle:
        config = json.loads(handle.metadata()["config"])
    head = ValueHead(**config)
    head.load_state_dict(load_file(str(path)))
    return head


class PolicyWithValue(nn.Module):
    """A causal LM and its value head as one module: the parameters are `policy.*` and `value_head.*`. Without a
    value head (critic-free advantages) the values it returns are None and it holds no value-head parameters."""

    def __init__(self, policy: nn.Module, value_head: ValueHead | None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        start: int = 0,
        end: int = 0,
        candidates: dict | None = None,
        stream: dict | None = None,
        values_at: str = "value_at",
        trunk_layers: int = 0,
    ):
        """(logits (B, end - start, V), values (B, end - start)) at positions start..end-1 of the sequences.

        Episode context passes only `stream` (packed rows; `trunk_layers`: start from their kept trunk states) and
        gets lib.streams.stream_outputs's logits and values.
        Score mode passes only `candidates`, the keyword arguments of lib.scoring.candidate_logprobs (prompt_ids,
        candidate_ids, pad_id, length_normalize), and gets (scores per state, values (S,)). It enters through this
        forward so that DDP and DeepSpeed wrappers see the call (ZeRO-3 gathers the weights in it).
        """
        if stream is not None:  # --context episode: packed stream segments (lib.streams.pack_stream_segments)
            return stream_outputs(self.policy, stream, self.value_head, values_at, trunk_layers)
        if candidates is not None:
            # With gradient (the update) one packed row per state: backward keeps each prompt's keys and values once,
            # not once per candidate as the cached way's copies would (several GB); acting uses the faster cached way.
            # Kept trunk states (lib/trunk.py) are laid out for the packed row.
            packed = torch.is_grad_enabled() or "trunks" in candidates
            score = candidate_logprobs_packed if packed else candidate_logprobs
            if self.value_head is None:
                return score(self.policy, **candidates), None
            return score(self.policy, **candidates, value_head=self.value_head)
        hidden = decoder_hidden(self.policy, input_ids, attention_mask, position_ids)[:, start:end]
        values = None if self.value_head is None else self.value_head(hidden)
        return self.policy.get_output_embeddings()(hidden), values


def decoder_hidden(model: nn.Module, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """The decoder's last hidden state (after its final norm), (B, L, H), without computing any logits."""
    decoder = model.get_decoder()
    output = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return output.last_hidden_state
