"""Bottleneck adapters, BitFit and full fine-tuning: identity at init, trainable sets, round trips."""

import pytest
import torch
from conftest import logits, randomize, tiny

from lmlab import LmlabError, peft
from lmlab.peft import adapter, bitfit, full


def test_adapter_is_identity_at_init(family, ids):
    base = logits(tiny(family).eval(), ids)
    model = adapter.apply(tiny(family), adapter.AdapterConfig(bottleneck=8)).eval()
    assert torch.equal(logits(model, ids), base)


def test_adapter_sits_after_attention_and_feed_forward(family):
    model = adapter.apply(tiny(family), adapter.AdapterConfig(bottleneck=8))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, adapter.AdapterLayer)]
    layers = model.config.num_hidden_layers
    assert len(wrapped) == 2 * layers
    assert sum(("attn" in n) for n in wrapped) == layers  # one after each attention sublayer


@pytest.mark.parametrize("train_norms", [False, True])
def test_adapter_trainable_set(family, train_norms):
    model = adapter.apply(tiny(family), adapter.AdapterConfig(bottleneck=8, train_layer_norms=train_norms))
    for name, p in model.named_parameters():
        is_norm = any(k in name for k in ("ln_", "layernorm", "model.norm"))
        assert p.requires_grad == (".adapter." in name or (train_norms and is_norm)), name


def test_adapter_trains_and_round_trips(family, ids, tmp_path):
    model = adapter.apply(tiny(family), adapter.AdapterConfig(bottleneck=8)).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # after step 1 W_up is nonzero, so step 2 moves W_down too
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and p.grad.abs().sum() > 0}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    adapter.save(model, tmp_path)
    restored = peft.load(tiny(family), tmp_path)
    torch.testing.assert_close(logits(restored.eval(), ids), logits(model.eval(), ids), atol=1e-6, rtol=0)


def test_adapter_bad_config():
    with pytest.raises(LmlabError, match="bottleneck"):
        adapter.AdapterConfig(bottleneck=0)
    with pytest.raises(LmlabError, match="activation"):
        adapter.AdapterConfig(activation="swish2")


def test_bitfit_trains_only_biases(ids):
    model = bitfit.apply(tiny("tiny-gpt2"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".bias") for n in trainable)
    assert len(trainable) == sum(1 for n, _ in model.named_parameters() if n.endswith(".bias"))


def test_bitfit_on_bias_free_model_is_a_clear_error():
    with pytest.raises(LmlabError, match="bias terms only.*has none"):
        bitfit.apply(tiny("tiny-llama"))


def test_bitfit_round_trip(ids, tmp_path):
    model = bitfit.apply(tiny("tiny-gpt2"))
    randomize([p for p in model.parameters() if p.requires_grad])
    bitfit.save(model, tmp_path)
    restored = peft.load(tiny("tiny-gpt2"), tmp_path)
    torch.testing.assert_close(logits(restored.eval(), ids), logits(model.eval(), ids), atol=1e-6, rtol=0)


def test_full_trains_everything_and_round_trips(family, ids, tmp_path):
    model = full.apply(tiny(family))
    assert all(p.requires_grad for p in model.parameters())
    randomize([model.get_output_embeddings().weight], std=0.5)
    full.save(model, tmp_path / "ckpt")
    full.save(model, tmp_path / "ckpt")  # overwriting an existing checkpoint works
    restored = peft.load(tiny(family, seed=3), tmp_path / "ckpt")
    torch.testing.assert_close(logits(restored.eval(), ids), logits(model.eval(), ids), atol=1e-6, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folders left


def test_full_checkpoint_of_another_model_is_an_error(tmp_path):
    full.save(tiny("tiny-gpt2"), tmp_path)
    with pytest.raises(LmlabError, match="another model"):
        full.load(tiny("tiny-llama"), tmp_path)


def test_detect_and_unknown_folder(tmp_path):
    with pytest.raises(LmlabError, match="no lmlab or PEFT checkpoint"):
        peft.detect(tmp_path)
    with pytest.raises(LmlabError, match="unknown method"):
        peft.make_config("qlora")
