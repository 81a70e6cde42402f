"""Phi, Phi-3, T5 / Flan-T5 and BART: the explicit module maps against built models, every method
that applies on a tiny model of each family, and the refusals of the ones that do not."""

import dataclasses

import pytest
import torch
from conftest import randomize, tiny

from lmlab import LmlabError, peft
from lmlab.calc import memory, params
from lmlab.cli import main
from lmlab.models import build_model, model_spec, preset_config
from lmlab.peft import adapter, bitfit, full, lora, prefix

NEW = ["tiny-phi", "tiny-phi3", "tiny-t5", "tiny-flan-t5", "tiny-bart"]
ALL_TINY = ["tiny-gpt2", "tiny-llama", *NEW]
BIASED = {"tiny-gpt2", "tiny-phi", "tiny-bart"}  # BitFit applies
DECODER_ONLY = {"tiny-gpt2", "tiny-llama", "tiny-phi", "tiny-phi3"}  # prefix tuning applies

# Published architectures: (preset, parameters as transformers builds them). transformers >= 5 ties
# T5's head to the shared embeddings for Flan-T5 too, so flan-t5-base counts 222.9M, not the
# checkpoint's 247.6M (its untied head is 32128 x 768 = 24.7M more).
PUBLISHED = [("phi-1_5", 1_418_270_720), ("phi-2", 2_779_683_840), ("phi-3-mini", 3_821_079_552),
             ("t5-small", 60_506_624), ("t5-base", 222_903_552), ("flan-t5-small", 60_511_616),
             ("flan-t5-base", 222_903_552), ("flan-t5-large", 750_251_008),
             ("bart-base", 139_420_416), ("bart-large", 406_291_456)]


# Merging B A into W0 rounds differently from adding B A x: Flan-T5's unscaled logits (~40) move by ~4e-5.
MERGED = {"atol": 1e-4, "rtol": 1e-4}


def run(model, ids, **kw):
    """Logits of a causal LM, or of an encoder-decoder with the input as the decoder's input too."""
    extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(ids, **extra, **kw).logits


def loss(model, ids):
    return model(ids, labels=ids).loss


def method_cases():
    """(preset, method, config kwargs) for every method that applies to each tiny preset."""
    cases = []
    for name in ALL_TINY:
        cases += [(name, "lora", {"r": 4}), (name, "lora", {"r": 2, "target_modules": "all-linear", "use_dora": True}),
                  (name, "lora", {"r": 4, "modules_to_save": ("lm_head",)}),
                  (name, "adapter", {"bottleneck": 8}), (name, "adapter", {"bottleneck": 4, "train_layer_norms": True}),
                  (name, "full", {})]
        if name in BIASED:
            cases.append((name, "bitfit", {}))
        if name in DECODER_ONLY:
            cases += [(name, "prefix", {"length": 3}), (name, "prefix", {"length": 3, "hidden": 16})]
    peft_targets = {"tiny-t5": ("q", "v"), "tiny-flan-t5": ("k", "v", "wo"), "tiny-bart": ("q_proj", "v_proj", "fc2"),
                    "tiny-phi": ("q_proj", "v_proj", "fc1", "fc2"), "tiny-phi3": ("qkv_proj", "gate_up_proj")}
    cases += [(name, "lora", {"r": 4, "target_modules": t}) for name, t in peft_targets.items()]
    cases += [("tiny-t5", "lora", {"r": 4, "target_modules": r"decoder\..*EncDecAttention\.[qv]"}),
              ("tiny-bart", "lora", {"r": 4, "target_modules": ("encoder_attn.q_proj",)})]
    return [pytest.param(*case, id=f"{case[0]}-{case[1]}-" + ",".join(f"{k}={v}" for k, v in case[2].items()))
            for case in cases]


@pytest.mark.parametrize("preset", [*ALL_TINY, *(p for p, _ in PUBLISHED)])
def test_map_lists_every_parameter_of_the_built_model(preset):
    """The spec's tables, expanded, are exactly the model's parameters: names and sizes."""
    config = preset_config(preset)
    model = build_model(config, device="meta")
    built = sorted((n, p.numel()) for n, p in model.named_parameters())
    assert sorted(params.parameter_sizes(model_spec(config))) == built


@pytest.mark.parametrize("preset,total", PUBLISHED)
def test_published_totals(preset, total):
    assert params.base_count(model_spec(preset_config(preset))) == total


def test_broken_map_is_caught():
    """A map with one wrong shape (T5's cross-attention q as d x d instead of d x heads*d_kv) fails."""
    spec = model_spec(preset_config("tiny-flan-t5"))
    broken = tuple(dataclasses.replace(lin, parts=(("q", spec.hidden),)) if lin.key == "EncDecAttention.q" else lin
                   for lin in spec.linears)
    bad = dataclasses.replace(spec, linears=broken)
    model = build_model(preset_config("tiny-flan-t5"), device="meta")
    built = sorted((n, p.numel()) for n, p in model.named_parameters())
    assert sorted(params.parameter_sizes(bad)) != built
    assert params.lora_count(bad, 4, ["q"]) != params.lora_count(spec, 4, ["q"])


@pytest.mark.parametrize("preset,method,kwargs", method_cases())
def test_closed_form_equals_real_count(preset, method, kwargs):
    r = params.report(preset, method, peft.make_config(method, **kwargs))
    assert r["trainable"] == r["closed_form_trainable"] > 0


@pytest.mark.parametrize("preset,method,match", [
    ("tiny-t5", "bitfit", "bias terms only.*has none.*choose lora, adapter or full"),
    ("tiny-flan-t5", "bitfit", "has none"),
    ("tiny-phi3", "bitfit", "has none.*prefix"),
    ("tiny-t5", "prefix", "decoder-only.*choose lora, adapter or full"),
    ("tiny-bart", "prefix", "decoder-only.*choose lora, adapter, bitfit or full"),
])
def test_methods_that_do_not_apply_are_refused(preset, method, match, capsys):
    with pytest.raises(LmlabError, match=match):
        params.report(preset, method, peft.make_config(method))
    assert main(["params", "--model", preset, "--method", method]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error:") and "\n" not in err


def test_default_lora_targets_are_attention_qkv():
    """lmlab's rule in every family: the attention's q, k, v (cross-attention's too in T5 and BART)."""
    expected = {"tiny-gpt2": ("c_attn",), "tiny-llama": ("q_proj", "k_proj", "v_proj"),
                "tiny-phi": ("q_proj", "k_proj", "v_proj"), "tiny-phi3": ("qkv_proj",), "tiny-t5": ("q", "k", "v"),
                "tiny-flan-t5": ("q", "k", "v"), "tiny-bart": ("q_proj", "k_proj", "v_proj")}
    for name, qkv in expected.items():
        assert model_spec(preset_config(name)).qkv == qkv
    model = lora.apply(tiny("tiny-t5"), lora.LoraConfig(r=2))
    wrapped = set(lora.lora_layers(model))
    assert len(wrapped) == 3 * (2 + 2 + 2)  # q, k, v of 2 encoder, 2 decoder self- and 2 cross-attentions
    assert any("EncDecAttention" in n for n in wrapped)


def test_hand_worked_counts():
    t5 = model_spec(preset_config("t5-small"))
    # LoRA r=8 on q, v: 6 encoder + 6 decoder self + 6 cross attentions, 2 matrices of 512 x 512 each:
    # 36 * 8 * (512 + 512) = 294,912
    assert params.lora_count(t5, 8, ["q", "v"]) == 294_912
    phi3 = model_spec(preset_config("phi-3-mini"))
    # fused qkv_proj 3072 -> 9216: 32 layers * 16 * (3072 + 9216) = 6,291,456; its q slice 3072 -> 3072
    assert params.lora_count(phi3, 16) == 6_291_456
    assert params.target_shape(phi3, "q") == (3072, 3072) and params.target_shape(phi3, "qkv_proj") == (3072, 9216)
    bart = model_spec(preset_config("bart-base"))
    # BitFit on bart-base: 6 encoder blocks * (4*768 + 3072 + 768 + 2*2*768) + 6 decoder blocks
    # * (8*768 + 3072 + 768 + 3*2*768) + 2 embedding LayerNorms * 2*768 = 125,952
    assert params.bitfit_count(bart) == 125_952


def test_memory_calculator_counts_every_adapted_matrix():
    shape = memory.model_shape("t5-small")
    # q and v in 18 attentions: 36 matrices of 512 x 512 = 9,437,184; LoRA r=4: 36 * 4 * 1024 = 147,456
    assert memory.matrix_params(shape, ("q", "v")) == 9_437_184
    assert memory.lora_params(shape, ("q", "v"), 4) == 147_456
    assert memory.storage(shape, 2, ("q", "v"), 4)["per_task_params"]["full"] == 60_506_624


# --- every applicable method works on a built tiny model -------------------------------------------


@pytest.fixture(params=NEW)
def arch(request) -> str:
    return request.param


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_works(arch, ids, tmp_path, use_dora):
    base = run(tiny(arch).eval(), ids)
    config = lora.LoraConfig(r=4, dropout=0.0, use_dora=use_dora)
    model = lora.apply(tiny(arch), config).train()
    assert torch.equal(run(model, ids), base)  # B = 0: the base model (Hu et al. 2021, eq. 3)
    trainable, _ = peft.count_parameters(model)
    assert trainable == params.closed_form(model_spec(model.config), "lora", config, 0)
    loss(model, ids).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    randomize([p for n, p in model.named_parameters() if "lora_B" in n])
    unmerged = run(model, ids)
    assert not torch.allclose(unmerged, base)
    torch.testing.assert_close(run(model.eval(), ids), unmerged, **MERGED)  # merged
    lora.save(model, tmp_path)
    restored = peft.load(tiny(arch), tmp_path)
    torch.testing.assert_close(run(restored.eval(), ids), unmerged, **MERGED)
    w0 = {n.removesuffix(".weight"): p for n, p in tiny(arch).named_parameters() if n.endswith(".weight")}
    model.train()  # unmerge restores W0 bit for bit
    layers = lora.lora_layers(model)
    assert all(torch.equal(layer.base_layer.weight, w0[name]) for name, layer in layers.items())
    merged = lora.merge_and_unload(model)
    torch.testing.assert_close(run(merged.eval(), ids), unmerged, **MERGED)


PEFT_TARGETS = {"tiny-phi": ["q_proj", "v_proj"], "tiny-phi3": ["qkv_proj"], "tiny-t5": ["q", "v"],
                "tiny-flan-t5": ["q", "v", "wo"], "tiny-bart": ["q_proj", "v_proj"]}


def test_lora_matches_peft(arch, ids, tmp_path):
    """peft reads lmlab's adapter and computes the same logits; same trainable count for the same targets."""
    peft_lib = pytest.importorskip("peft")
    targets = PEFT_TARGETS[arch]
    model = lora.apply(tiny(arch), lora.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=tuple(targets)))
    randomize([p for n, p in model.named_parameters() if "lora_B" in n])
    ours = run(model.train(), ids)
    lora.save(model, tmp_path)
    task = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"
    theirs = peft_lib.PeftModel.from_pretrained(tiny(arch), tmp_path).eval()
    assert theirs.peft_config["default"].task_type == task
    torch.testing.assert_close(run(theirs, ids), ours, **MERGED)
    fresh = peft_lib.get_peft_model(tiny(arch), peft_lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    assert fresh.get_nb_trainable_parameters()[0] == peft.count_parameters(model)[0]


def test_adapter_works(arch, ids, tmp_path):
    base = run(tiny(arch).eval(), ids)
    config = adapter.AdapterConfig(bottleneck=8)
    model = adapter.apply(tiny(arch), config).train()
    assert torch.equal(run(model, ids), base)
    spec = model_spec(model.config)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, adapter.AdapterLayer)]
    assert len(wrapped) == 2 * (spec.layers + spec.encoder_layers)
    assert peft.count_parameters(model)[0] == params.adapter_count(spec, 8)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # after step 1 W_up is nonzero, so step 2 moves W_down too
        opt.zero_grad()
        loss(model, ids).backward()
        opt.step()
    adapter.save(model, tmp_path)
    restored = peft.load(tiny(arch), tmp_path)
    torch.testing.assert_close(run(restored.eval(), ids), run(model.eval(), ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset", sorted(BIASED - {"tiny-gpt2"}))
def test_bitfit_works(preset, ids, tmp_path):
    model = bitfit.apply(tiny(preset))
    assert peft.count_parameters(model)[0] == params.bitfit_count(model_spec(model.config))
    loss(model, ids).backward()
    randomize([p for p in model.parameters() if p.requires_grad])
    bitfit.save(model, tmp_path)
    restored = peft.load(tiny(preset), tmp_path)
    torch.testing.assert_close(run(restored.eval(), ids), run(model.eval(), ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset", ["tiny-phi", "tiny-phi3"])
def test_prefix_works(preset, ids, tmp_path):
    config = prefix.PrefixConfig(length=3, hidden=16)
    model = prefix.apply(tiny(preset), config).train()
    assert peft.count_parameters(model)[0] == params.prefix_count(model_spec(model.config), 3, 16)
    loss(model, ids).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    prefix.save(model, tmp_path)
    restored = peft.load(tiny(preset), tmp_path).eval()
    torch.testing.assert_close(run(restored, ids), run(model.eval(), ids), **MERGED)
    with torch.no_grad():  # generate() with the KV cache picks what one full forward picks
        out = restored.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out[0, 5:], restored(out).logits[0, 4:-1].argmax(-1))


def test_full_works(arch, ids, tmp_path):
    model = full.apply(tiny(arch))
    assert peft.count_parameters(model)[0] == params.base_count(model_spec(model.config))
    loss(model, ids).backward()
    full.save(model, tmp_path / "ckpt")
    restored = peft.load(tiny(arch, seed=3), tmp_path / "ckpt")
    torch.testing.assert_close(run(restored.eval(), ids), run(model.eval(), ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset,targets", [("phi-2", ["q_proj", "v_proj", "fc1", "fc2"]), ("phi-3-mini", ["qkv_proj"]),
                                            ("t5-small", ["q", "v"]), ("flan-t5-base", ["q", "v"]),
                                            ("bart-base", ["q_proj", "v_proj"])])
def test_published_sizes_count_as_peft_does(preset, targets):
    """peft's own defaults (phi3: the fused qkv_proj) on the published shapes, built on the meta device."""
    peft_lib = pytest.importorskip("peft")
    model = build_model(preset_config(preset), device="meta")
    theirs = peft_lib.get_peft_model(model, peft_lib.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    ours = params.report(preset, "lora", peft.make_config("lora", r=8, target_modules=tuple(targets)))
    assert (ours["trainable"], ours["total"]) == theirs.get_nb_trainable_parameters()
    assert ours["closed_form_agrees"]
