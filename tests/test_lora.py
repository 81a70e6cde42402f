"""LoRA: identity at init, merge/unmerge, exact restore, trainable set, PEFT interop both ways."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from conftest import logits, randomize, tiny

from lmlab import LmlabError
from lmlab.peft import lora


def lora_model(family, r=4, alpha=8.0, targets=None, seed=0):
    model = tiny(family, seed)  # no dropout: train mode must be deterministic to compare logits
    lora.apply(model, lora.LoraConfig(r=r, alpha=alpha, dropout=0.0, target_modules=targets))
    return model


def randomize_lora(model):
    randomize([layer.lora_B.weight for layer in lora.lora_layers(model).values()])


def test_identity_at_init(family, ids):
    base = logits(tiny(family).eval(), ids)
    model = lora_model(family)
    assert torch.equal(logits(model.eval(), ids), base)
    assert torch.equal(logits(model.train(), ids), base)


def test_merged_equals_unmerged(family, ids):
    model = lora_model(family)
    randomize_lora(model)
    unmerged = logits(model.train(), ids)
    merged = logits(model.eval(), ids)
    assert all(layer.merged for layer in lora.lora_layers(model).values())
    assert not torch.allclose(merged, logits(tiny(family).eval(), ids), atol=1e-3)  # LoRA does something
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_train_eval_train_restores_weights_exactly(family):
    model = lora_model(family)
    randomize_lora(model)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "eval() should merge B A into the base weights"
    model.train()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_training_in_eval_mode_still_reaches_lora(family, ids):
    """Merged forward with gradients enabled must still route gradients to A and B."""
    model = lora_model(family)
    randomize_lora(model)
    model.eval()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family,targets,expected", [
    ("tiny-gpt2", None, {"c_attn"}),
    ("tiny-llama", None, {"q_proj", "k_proj", "v_proj"}),
    ("tiny-gpt2", ("c_attn", "c_fc"), {"c_attn", "c_fc"}),
    ("tiny-llama", r".*\.0\.self_attn\.(q|v)_proj", {"q_proj", "v_proj"}),
])
def test_only_lora_weights_train(family, targets, expected):
    model = lora_model(family, targets=targets)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == expected


def test_gradients_reach_every_lora_weight(family, ids):
    model = lora_model(family).train()
    randomize_lora(model)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


@pytest.mark.parametrize("kwargs,message", [
    ({"r": 0}, "rank"), ({"r": -2}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
])
def test_bad_config_is_one_clear_error(kwargs, message):
    with pytest.raises(LmlabError, match=message):
        lora.LoraConfig(**kwargs)


def test_one_set_of_defaults(capsys):
    """params, finetune and dpo (and a sweep's FinetuneConfig) apply the same LoRA defaults, those of
    LoraConfig: r 128, alpha 4r unless given (so --rank 16 means alpha 64), dropout 0.05."""
    from lmlab.cli import build_parser, method_config
    from lmlab.finetune import FinetuneConfig
    from lmlab.finetune import method_config as from_config

    assert lora.LoraConfig() == lora.LoraConfig(r=128, alpha=512.0, dropout=0.05)
    assert lora.LoraConfig(r=16).alpha == lora.default_alpha(16) == 64.0 and lora.LoraConfig(r=16, alpha=32).alpha == 32
    parser = build_parser()
    commands = (["params"], ["finetune"], ["dpo", "--data", "pairs.jsonl"])
    for extra, expected in (([], lora.LoraConfig()), (["--rank", "16"], lora.LoraConfig(r=16, alpha=64.0)),
                            (["--rank", "16", "--alpha", "32", "--lora-dropout", "0"],
                             lora.LoraConfig(r=16, alpha=32.0, dropout=0.0))):
        assert [method_config(parser.parse_args(argv + extra)) for argv in commands] == [expected] * 3
    config = FinetuneConfig()
    assert (config.rank, config.alpha, config.lora_dropout) == (128, None, 0.05)  # as run.json records them
    assert from_config(config) == lora.LoraConfig() and from_config(FinetuneConfig(rank=16)).alpha == 64.0
    # the help repeats the defaults (reading them there would import torch into `lmlab --help`)
    for argv in commands:
        with pytest.raises(SystemExit):
            parser.parse_args([argv[0], "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"LoRA rank r (default {lora.LoraConfig.r})" in text and "(default 4 x rank)" in text
        assert f"LoRA branch input (default {lora.LoraConfig.dropout})" in text


def test_resume_keeps_the_recorded_alpha(tmp_path):
    """A run recorded before alpha followed the rank (--rank 16 kept alpha 512) resumes as it trained."""
    from lmlab.finetune import FinetuneConfig, method_config, resumed
    from lmlab.io import write_json

    old = {"rank": 16, "alpha": 512.0, "lora_dropout": 0.05, "lr": 1e-3, "out_dir": str(tmp_path)}
    write_json(tmp_path / "run.json", {"options": old})
    for given in ({}, {"rank": 16}, {"alpha": 512.0}):
        config = resumed(FinetuneConfig(out_dir=str(tmp_path), resume=True, **given))
        assert (config.rank, config.alpha, config.lr) == (16, 512.0, 1e-3)
        assert method_config(config) == lora.LoraConfig(r=16, alpha=512.0, dropout=0.05)
    with pytest.raises(LmlabError, match="--alpha 64.0 differs from its 512.0"):
        resumed(FinetuneConfig(out_dir=str(tmp_path), resume=True, alpha=64.0))


def test_target_matching_nothing_is_an_error(family):
    with pytest.raises(LmlabError, match="matches no"):
        lora_model(family, targets=("no_such_proj",))


def test_save_load_roundtrip(family, ids, tmp_path):
    model = lora_model(family)
    randomize_lora(model)
    lora.save(model, tmp_path)
    restored = lora.load(tiny(family), tmp_path)
    torch.testing.assert_close(logits(restored.eval(), ids), logits(model.eval(), ids), atol=1e-6, rtol=0)


def test_loading_into_another_model_is_an_error(tmp_path):
    lora.save(lora_model("tiny-llama"), tmp_path)
    other = tiny("tiny-llama")
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 32, bias=False)
    with pytest.raises(LmlabError):
        lora.load(other, tmp_path)


def test_peft_loads_lmlab_adapter_with_equal_logits(family, ids, tmp_path):
    peft = pytest.importorskip("peft")
    model = lora_model(family)
    randomize_lora(model)
    lora.save(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny(family), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids), logits(model.eval(), ids), atol=1e-5, rtol=0)


def test_lmlab_loads_peft_adapter_with_equal_logits(family, ids, tmp_path):
    peft = pytest.importorskip("peft")
    targets = ["c_attn"] if family == "tiny-gpt2" else ["q_proj", "v_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, fan_in_fan_out=family == "tiny-gpt2",
                             init_lora_weights=False)  # random B, so the adapter is not a no-op
    theirs = peft.get_peft_model(tiny(family), config).eval()
    theirs.save_pretrained(tmp_path)
    ours = lora.load(tiny(family), tmp_path).eval()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(ours, ids), logits(tiny(family).eval(), ids), atol=1e-3)


def test_merge_and_unload_gives_plain_model(family, ids):
    model = lora_model(family)
    randomize_lora(model)
    expected = logits(model.eval(), ids)
    plain = lora.merge_and_unload(model)
    assert not lora.lora_layers(plain)
    torch.testing.assert_close(logits(plain, ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_disabled_is_the_base_model(family, ids, mode):
    """Inside ``lora.disabled`` the adapted model gives the base model's logits, merged or not;
    outside it the adapter is back."""
    base = tiny(family)
    model = lora.apply(copy.deepcopy(base), lora.LoraConfig(r=4, alpha=8, dropout=0.0))
    randomize([p for n, p in model.named_parameters() if "lora_B" in n], std=0.3)
    getattr(model, mode)()
    x = ids
    adapted = logits(model, x)
    with lora.disabled(model):
        assert torch.allclose(logits(model, x), logits(base.eval(), x), atol=1e-5)
    assert torch.allclose(logits(model, x), adapted) and not torch.allclose(adapted, logits(base, x), atol=1e-3)


class PackedLinear(nn.Linear):
    """A stand-in for bitsandbytes' Linear4bit: the weight is stored packed (int8, shape (n, 1)),
    not as (d_out, d_in) floats, and dequantised in forward."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)
        w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(0))
        self.scale = float(w.abs().max()) / 7
        packed = (w / self.scale).round().clamp(-8, 7).to(torch.int8).reshape(-1, 1)
        self.weight = nn.Parameter(packed, requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight.reshape(self.out_features, self.in_features).float() * self.scale)


def test_eval_does_not_merge_into_a_sharded_base_weight():
    """Under ZeRO-3 a partitioned weight is an empty placeholder between forwards, under FSDP1 a
    full-shape view of freed storage: validation's eval() must not merge into either (it failed:
    size 0 against 16) and train() finds it as it was; a whole weight is merged as before."""
    layer = lora.LoraLayer(nn.Linear(16, 8), r=4, alpha=8.0, dropout=0.0)
    whole = layer.base_layer.weight.data.clone()
    layer.base_layer.weight.data = torch.empty(0)
    layer.eval()
    assert not layer.merged and layer.base_layer.weight.shape == (0,)
    layer.train()
    assert layer.base_layer.weight.shape == (0,)
    freed = whole.clone()  # FSDP1 keeps the full shape and frees the storage between forwards
    freed.untyped_storage().resize_(0)
    layer.base_layer.weight.data = freed
    layer.eval()
    assert not layer.merged
    layer.train()
    layer.base_layer.weight.data = whole.clone()
    layer.eval()
    assert layer.merged


def test_lora_on_a_quantised_base_layer():
    """QLoRA: LoRA's shapes come from in/out_features (not the packed weight), its weights are fp32,
    the base is never merged into (eval() leaves it untouched) and merge_and_unload refuses."""
    base = PackedLinear(12, 20)
    layer = lora.LoraLayer(base, r=4, alpha=8.0, dropout=0.0)
    assert layer.quantized and layer.lora_A.weight.shape == (4, 12) and layer.lora_B.weight.shape == (20, 4)
    assert layer.lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    packed = base.weight.detach().clone()
    x = torch.randn(3, 12)
    expected = base(x) + 2.0 * layer.lora_B(layer.lora_A(x))
    for mode in (True, False):
        layer.train(mode)
        assert torch.equal(base.weight, packed) and not layer.merged
        torch.testing.assert_close(layer(x), expected)
    model = nn.Sequential(layer)
    with pytest.raises(LmlabError, match="quantised base"):
        lora.merge_and_unload(model)
