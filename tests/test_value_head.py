import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lib.models import freeze_lower_layers, load_model
from lib.sequences import pack_sequences
from lib.value_head import VALUE_HEAD_FILE, PolicyWithValue, ValueHead, load_value_head, save_value_head


def tiny_llama(num_layers=3, tied=True):
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def inputs(pad_id=0):
    return pack_sequences([[5, 6, 7], [8, 9]], [[10, 11], [12]], pad_id)


@pytest.mark.parametrize("head_type", ["linear", "mlp"])
def test_shapes_and_zero_start(head_type):
    model = PolicyWithValue(tiny_llama(), ValueHead(16, head_type, mlp_hidden_size=8))
    packed = inputs()
    logits, values = model(packed["input_ids"], packed["attention_mask"], packed["position_ids"], packed["start"], packed["end"])
    assert logits.shape == (2, 2, 50)
    assert values.shape == (2, 2)
    assert torch.all(values == 0)  # zero-initialised output layer


@pytest.mark.parametrize("detach", [True, False])
def test_detached_value_head_gives_no_gradient_to_the_lm(detach):
    model = PolicyWithValue(tiny_llama(), ValueHead(16, "mlp", detach_input=detach))
    torch.nn.init.normal_(model.value_head.net[-1].weight)
    packed = inputs()
    _, values = model(packed["input_ids"], packed["attention_mask"], packed["position_ids"], packed["start"], packed["end"])
    (values**2).sum().backward()
    lm_grads = [p.grad for p in model.policy.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    head_grads = [p.grad for p in model.value_head.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert head_grads
    assert (not lm_grads) if detach else lm_grads


def test_value_head_file_round_trip(tmp_path):
    head = ValueHead(16, "mlp", mlp_hidden_size=8, detach_input=True)
    torch.nn.init.normal_(head.net[-1].weight)
    save_value_head(head, tmp_path)
    loaded = load_value_head(tmp_path)
    assert loaded.config() == head.config()
    hidden = torch.randn(3, 16)
    assert torch.equal(loaded(hidden), head(hidden))
    with pytest.raises(FileNotFoundError, match=VALUE_HEAD_FILE):
        load_value_head(tmp_path / "elsewhere")


def test_value_head_type_is_checked():
    with pytest.raises(ValueError, match="linear, mlp"):
        ValueHead(16, "transformer")


def test_policy_forward_matches_the_lm_logits(tiny_model_path):
    policy = load_model(tiny_model_path)
    model = PolicyWithValue(policy, ValueHead(policy.config.hidden_size))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    mask = torch.ones_like(ids)
    logits, _ = model(ids, mask, torch.arange(5)[None], 1, 4)
    assert torch.allclose(logits, policy(ids).logits[:, 1:4], atol=1e-5)


def run_backward(model):
    ids = torch.tensor([[1, 2, 3, 4]])
    wrapped = PolicyWithValue(model, ValueHead(16))
    logits, values = wrapped(ids, torch.ones_like(ids), torch.arange(4)[None], 0, 4)
    (logits.logsumexp(-1).sum() + values.sum()).backward()


@pytest.mark.parametrize("tied", [True, False])
def test_trainable_layers_fraction_freezes_the_trunk(tied):
    model = tiny_llama(num_layers=3, tied=tied)
    names = freeze_lower_layers(model, 0.34)  # ceil(0.34 * 3) = 2 layers train
    expected = {n for n, _ in model.named_parameters() if n.startswith(("model.layers.1.", "model.layers.2.", "model.norm."))}
    if not tied:
        expected.add("lm_head.weight")
    assert set(names) == expected
    run_backward(model)
    for name, param in model.named_parameters():
        if name in expected:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name  # autograd never reached the frozen trunk


def test_trainable_layers_fraction_one_trains_everything_and_range_is_checked():
    model = tiny_llama()
    assert len(freeze_lower_layers(model, 1.0)) == len(list(model.parameters()))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="trainable_layers_fraction"):
            freeze_lower_layers(model, bad)
