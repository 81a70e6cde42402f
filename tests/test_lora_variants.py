"""LoRA's options as peft has them: rsLoRA, DoRA, target "all-linear", modules_to_save. Each gives
peft's logits and gradients on the same weights, saves what peft loads, loads what peft saves, and
keeps LoRA's invariants (identity at init, merged == unmerged, exact restore, parameter counts)."""

import json

import pytest
import torch
from conftest import logits, randomize, tiny

from lmlab import LmlabError
from lmlab.calc import params
from lmlab.peft import count_parameters, lora

# peft, the reference here, warns when a copied module is tied to another (lmlab unties it, as
# peft does without ensure_weight_tying); the reference's advice is not lmlab's output.
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")

EMBED = {"tiny-gpt2": "wte", "tiny-llama": "embed_tokens"}
CASES = {  # name: LoraConfig options ("EMBED": the family's token embeddings)
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "all-linear": {"target_modules": "all-linear"},
    "head": {"modules_to_save": ("lm_head",)},
    "embeddings": {"modules_to_save": ("EMBED",)},
    "everything": {"use_rslora": True, "use_dora": True, "target_modules": "all-linear",
                   "modules_to_save": ("lm_head", "EMBED")},
}


def options(family, case, **extra):
    kw = {**CASES[case], **extra}
    if "modules_to_save" in kw:
        kw["modules_to_save"] = tuple(EMBED[family] if n == "EMBED" else n for n in kw["modules_to_save"])
    return kw


def lmlab_model(family, kw, dropout=0.0):
    return lora.apply(tiny(family), lora.LoraConfig(r=4, alpha=12.0, dropout=dropout, **kw))


def peft_model(family, kw, dropout=0.0):
    """peft's model with the same options, random A and B (init_lora_weights=False)."""
    peft = pytest.importorskip("peft")
    gpt2 = family == "tiny-gpt2"
    targets = kw.get("target_modules") or (["c_attn"] if gpt2 else ["q_proj", "k_proj", "v_proj"])
    config = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=targets, fan_in_fan_out=gpt2,
                             init_lora_weights=False, use_rslora=kw.get("use_rslora", False),
                             use_dora=kw.get("use_dora", False),
                             modules_to_save=list(kw.get("modules_to_save", [])) or None)
    return peft.get_peft_model(tiny(family), config)


def perturb(model):
    """Move DoRA's magnitudes off ||W0 + s B A||_c and the copies off the originals, so both matter."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name or "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def own_name(peft_name: str) -> str:
    """peft's in-memory parameter name -> lmlab's (no wrapper prefix, no adapter name)."""
    name = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return name.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")


def gradients(model, ids, rename=lambda n: n):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {rename(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_as_peft(ours, theirs, ids, seeded=False):
    """Logits in train and eval mode (ours merged in eval, peft's not) and every trainable gradient."""
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        torch.manual_seed(0)
        a = logits(ours, ids)
        torch.manual_seed(0)
        torch.testing.assert_close(a, logits(theirs, ids), atol=1e-5, rtol=0)
    ours.train(), theirs.train()
    torch.manual_seed(0)
    mine = gradients(ours, ids)
    torch.manual_seed(0)
    peft_grads = gradients(theirs, ids, own_name)
    assert mine.keys() == peft_grads.keys() and mine
    for name, grad in mine.items():
        torch.testing.assert_close(grad, peft_grads[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_lmlab_loads_peft_adapter_with_equal_logits_and_gradients(family, ids, tmp_path, case):
    kw = options(family, case)
    theirs = peft_model(family, kw)
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lora.load(tiny(family), tmp_path)
    for p in ours.parameters():  # a loaded adapter is for inference; train it here to compare gradients
        p.requires_grad_(False)
    lora.mark_only_lora_as_trainable(ours)
    assert_same_as_peft(ours, theirs, ids)
    assert not torch.allclose(logits(ours.eval(), ids), logits(tiny(family).eval(), ids), atol=1e-3)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_lmlab_adapter_with_equal_logits_and_gradients(family, ids, tmp_path, case):
    peft = pytest.importorskip("peft")
    kw = options(family, case)
    ours = lmlab_model(family, kw)
    perturb(ours)
    lora.save(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny(family), tmp_path / "ours", is_trainable=True)
    assert_same_as_peft(ours, theirs, ids)
    # the same files as peft writes: config fields and tensor names
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors import safe_open

    keys = [set(safe_open(tmp_path / d / lora.ADAPTER_WEIGHTS, "pt").keys()) for d in ("ours", "theirs")]
    assert keys[0] == keys[1]
    config = json.loads((tmp_path / "ours" / lora.ADAPTER_CONFIG).read_text())
    assert config["use_rslora"] == kw.get("use_rslora", False) and config["use_dora"] == kw.get("use_dora", False)
    assert config["modules_to_save"] == (sorted(lora.module_copies(ours)) or None)


def test_dora_with_dropout_matches_peft(family, ids, tmp_path, monkeypatch):
    """Training-mode dropout: peft recomputes W0 x' on the dropped-out input; the same masks (same
    seed, same order) must give the same logits and gradients. The same masks need torch's own
    draws, so lmlab's gap-drawn masks (``peft.dropout``) are switched off here."""
    monkeypatch.setattr("lmlab.peft.dropout.SPARSE_MAX_P", 0.0)
    kw = options(family, "dora")
    theirs = peft_model(family, kw, dropout=0.3)
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lora.load(tiny(family), tmp_path)
    assert all(layer.lora_dropout.p == 0.3 for layer in lora.lora_layers(ours).values())
    lora.mark_only_lora_as_trainable(ours)
    assert_same_as_peft(ours, theirs, ids)


def test_all_linear_targets_what_peft_targets(family):
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    theirs = peft_model(family, {"target_modules": "all-linear"})
    expected = {own_name(n) for n, m in theirs.named_modules() if isinstance(m, PeftLoraLayer)}
    ours = lmlab_model(family, {"target_modules": "all-linear"})
    assert set(lora.lora_layers(ours)) == expected and "lm_head" not in expected
    assert len(expected) == 2 * (4 if family == "tiny-gpt2" else 7)


@pytest.mark.parametrize("case", list(CASES))
def test_counts_agree_with_peft_and_closed_form(family, case):
    kw = options(family, case)
    ours = count_parameters(lmlab_model(family, kw))
    assert ours == peft_model(family, kw).get_nb_trainable_parameters()
    r = params.report(family, "lora", lora.LoraConfig(r=4, alpha=12.0, **kw))
    assert (r["trainable"], r["total"]) == ours and r["closed_form_agrees"]


@pytest.mark.parametrize("preset,kw", [
    ("gpt2", {"r": 8, "use_dora": True, "target_modules": "all-linear"}),
    ("gpt2", {"r": 8, "modules_to_save": ("lm_head", "wpe", "ln_f")}),
    ("smollm2-135m", {"r": 16, "use_dora": True, "target_modules": ("q_proj", "v_proj"),
                      "modules_to_save": ("embed_tokens", "norm")}),
])
def test_meta_count_agrees_with_closed_form(preset, kw):
    r = params.report(preset, "lora", lora.LoraConfig(**kw))
    assert r["trainable"] == r["closed_form_trainable"]


def test_closed_form_hand_worked():
    from lmlab.models import model_spec, preset_config

    gpt2 = model_spec(preset_config("gpt2"))
    # DoRA adds d_out per adapted matrix: 12 layers * 3 * 768 = 27,648 beside LoRA's 294,912 at r = 8 on c_attn
    assert params.lora_count(gpt2, 8, dora=True) == 294_912 + 12 * 3 * 768
    assert params.saved_modules_count(gpt2, ["lm_head"], 50257) == 50257 * 768
    with pytest.raises(LmlabError, match="closed form knows"):
        params.saved_modules_count(gpt2, ["c_fc"], 50257)


@pytest.mark.parametrize("case", list(CASES))
def test_identity_at_init(family, ids, case):
    base = logits(tiny(family).eval(), ids)
    model = lmlab_model(family, options(family, case))
    assert torch.equal(logits(model.train(), ids), base)
    assert torch.equal(logits(model.eval(), ids), base)


@pytest.mark.parametrize("case", ["rslora", "dora", "everything"])
def test_merged_equals_unmerged_and_restores_exactly(family, ids, case):
    model = lmlab_model(family, options(family, case))
    perturb(model)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = logits(model, ids)
    merged = logits(model.eval(), ids)
    assert all(layer.merged for layer in lora.lora_layers(model).values())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    model.train()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    plain = lora.merge_and_unload(model)  # a plain transformers model, same logits
    assert not lora.lora_layers(plain) and not lora.module_copies(plain)
    torch.testing.assert_close(logits(plain.eval(), ids), unmerged, atol=1e-5, rtol=0)


def test_dora_merged_weight_is_the_formula():
    """eval() merges W' = m (W0 + s B A) / ||W0 + s B A||_c (norm over the inputs of each output)."""
    base = torch.nn.Linear(6, 5)
    layer = lora.LoraLayer(base, r=2, alpha=4.0, dropout=0.0, use_dora=True)
    randomize([layer.lora_B.weight, layer.lora_magnitude_vector], std=0.5)
    w0 = base.weight.detach().clone()
    v = w0 + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    expected = layer.lora_magnitude_vector.detach()[:, None] * v / v.norm(dim=1, keepdim=True)
    x = torch.randn(3, 6)
    unmerged = layer.train()(x)
    layer.eval()
    torch.testing.assert_close(base.weight.detach(), expected)
    torch.testing.assert_close(layer(x), unmerged)
    layer.train()
    assert torch.equal(base.weight, w0)


def test_training_in_eval_mode_reaches_every_trained_weight(family, ids):
    model = lmlab_model(family, options(family, "everything"))
    perturb(model)
    model.eval()
    model(ids, labels=ids).loss.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[-1] for n, _ in trained} >= {"weight", "lora_magnitude_vector"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trained)


def test_disabled_is_the_base_model(family, ids):
    model = lmlab_model(family, options(family, "everything"))
    perturb(model)
    base = logits(tiny(family).eval(), ids)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with lora.disabled(model):
            torch.testing.assert_close(logits(model, ids), base, atol=1e-5, rtol=0)
        assert not torch.allclose(logits(model, ids), base, atol=1e-3)


def test_save_load_roundtrip(family, ids, tmp_path):
    model = lmlab_model(family, options(family, "everything"))
    perturb(model)
    lora.save(model, tmp_path)
    config = json.loads((tmp_path / lora.ADAPTER_CONFIG).read_text())
    assert config["use_dora"] and config["use_rslora"] and isinstance(config["target_modules"], list)
    restored = lora.load(tiny(family), tmp_path)
    assert restored.lm_head.modules_to_save.weight.shape == model.lm_head.modules_to_save.weight.shape
    torch.testing.assert_close(logits(restored.eval(), ids), logits(model.eval(), ids), atol=1e-6, rtol=0)


def test_still_refused_peft_options(tmp_path):
    lora.save(lmlab_model("tiny-llama", {}), tmp_path)
    config = json.loads((tmp_path / lora.ADAPTER_CONFIG).read_text())
    (tmp_path / lora.ADAPTER_CONFIG).write_text(json.dumps({**config, "rank_pattern": {"q_proj": 8}}))
    with pytest.raises(LmlabError, match="rank_pattern"):
        lora.read_config(tmp_path)


def test_bad_options_are_one_clear_error(family):
    with pytest.raises(LmlabError, match="matches no module"):
        lmlab_model(family, {"modules_to_save": ("no_such_module",)})
    target = "c_attn" if family == "tiny-gpt2" else "q_proj"
    with pytest.raises(LmlabError, match="also a LoRA target"):
        lmlab_model(family, {"target_modules": (target,), "modules_to_save": (target,)})
    quantised = torch.nn.Linear(4, 4, bias=False)
    quantised.weight = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(LmlabError, match="DoRA on a 4/8-bit"):
        lora.LoraLayer(quantised, r=2, alpha=4.0, dropout=0.0, use_dora=True)


def test_command_line_and_finetune_config(capsys):
    from lmlab.cli import build_parser, method_config
    from lmlab.finetune import FinetuneConfig
    from lmlab.finetune import method_config as from_config

    expected = lora.LoraConfig(use_rslora=True, use_dora=True, target_modules="all-linear",
                               modules_to_save=("lm_head", "wte"))
    flags = ["--use-rslora", "--use-dora", "--target", "all-linear", "--modules-to-save", "lm_head, wte"]
    parser = build_parser()
    for argv in (["params"], ["finetune"], ["dpo", "--data", "pairs.jsonl"]):
        assert method_config(parser.parse_args(argv + flags)) == expected
        assert method_config(parser.parse_args(argv)) == lora.LoraConfig()
    config = FinetuneConfig.from_options({"use_rslora": True, "use_dora": True, "target": "all-linear",
                                          "modules_to_save": "lm_head,wte"}).check()  # as a sweep's run
    assert from_config(config) == expected
    assert (FinetuneConfig().use_rslora, FinetuneConfig().use_dora, FinetuneConfig().modules_to_save) == (
        False, False, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "alpha/sqrt(r) instead of alpha/r (default off)" in text and "all-linear" in text
