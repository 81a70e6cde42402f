"""Model loading: presets, cache location, clear errors, a saved tiny model loads back with its
logits, and (slow) the embedded SmolLM2."""

import pytest
import torch

from lmlab import LmlabError
from lmlab.models import (
    DEFAULT_MODEL,
    PRESETS,
    build_model,
    cache_dir,
    load_model,
    model_config,
    model_spec,
    preset_config,
)


@pytest.mark.parametrize("name,family,hidden,layers", [
    ("gpt2", "gpt2", 768, 12), ("gpt2-medium", "gpt2", 1024, 24), ("gpt2-large", "gpt2", 1280, 36),
    ("gpt2-xl", "gpt2", 1600, 48), ("smollm2-135m", "llama", 576, 30), ("smollm2-135m-instruct", "llama", 576, 30),
])
def test_presets(name, family, hidden, layers):
    spec = model_spec(preset_config(name))
    assert (spec.family, spec.hidden, spec.layers) == (family, hidden, layers)


def test_smollm2_uses_grouped_query_attention():
    spec = model_spec(preset_config("smollm2-135m"))
    assert (spec.heads, spec.kv_heads, spec.kv_dim) == (9, 3, 192)


def test_cache_dir_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("LMLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lmlab"


def test_default_dtype_is_fp32():
    assert build_model(preset_config("tiny-llama")).dtype == torch.float32


@pytest.mark.parametrize("name,message", [
    ("./no/such/folder", "no such folder"),
    ("nobody-has/this-model-xyz", "cannot load model 'nobody-has/this-model-xyz'"),
])
def test_missing_model_is_one_clear_error(name, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LmlabError, match=message):
        load_model(name)


def test_unknown_preset_for_config():
    with pytest.raises(LmlabError):
        model_config("./missing-dir")
    assert "tiny-gpt2" in PRESETS


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_local_folder_round_trip(preset, tmp_path):
    """A tiny model saved as a folder loads back through ``load_model`` with the same weights (the
    same logits), in fp32, in eval mode, its tokenizer given a pad token; in bf16 on request (the
    same weights rounded)."""
    from transformers import AutoTokenizer

    from lmlab.models import embedded_model_dir, resolve

    config = preset_config(preset)
    config.initializer_range = 0.3  # logits far apart, so that other weights would show
    model = build_model(config, seed=3).eval()
    model.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())  # ids < 49,152 fit either vocabulary
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    assert resolve(str(tmp_path)) == str(tmp_path)
    loaded, tok = load_model(str(tmp_path))
    assert type(loaded) is type(model) and loaded.dtype == torch.float32 and not loaded.training
    assert tok.pad_token == tok.eos_token is not None
    ids = torch.randint(0, 49152, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)
    half, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    ours = model.state_dict()
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, ours[n].to(torch.bfloat16))
               for n, t in half.state_dict().items())


@pytest.mark.slow
def test_embedded_model_loads_and_generates():
    model, tokenizer = load_model(DEFAULT_MODEL)
    assert model.dtype == torch.float32 and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert (cache_dir() / "models" / DEFAULT_MODEL / "model.safetensors").exists()


def test_contiguous_head_input_changes_no_logits():
    from lmlab.models import contiguous_head_input

    model = build_model(preset_config("tiny-llama")).eval()
    head = model.get_output_embeddings()
    assert head._lmlab_contiguous_input and len(head._forward_pre_hooks) == 1
    contiguous_head_input(model)
    assert len(head._forward_pre_hooks) == 1  # idempotent
    ids = torch.randint(0, 1000, (3, 11))
    with torch.no_grad():
        hooked = model(ids, logits_to_keep=2).logits
        head._forward_pre_hooks.clear()
        plain = model(ids, logits_to_keep=2).logits
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=0)
