"""Parameter accounting: real modules on the meta device == closed form == what peft reports."""

import pytest

from lmlab import LmlabError, peft
from lmlab.calc import params
from lmlab.models import build_model, model_spec, preset_config

CASES = [  # (preset, method, config kwargs)
    ("gpt2", "lora", {"r": 8}),
    ("gpt2-medium", "lora", {"r": 4, "target_modules": ("c_attn", "c_fc")}),
    ("gpt2-xl", "lora", {"r": 16}),
    ("smollm2-135m", "lora", {"r": 16}),
    ("smollm2-135m", "lora", {"r": 8, "target_modules": ("q_proj", "v_proj", "down_proj")}),
    ("gpt2", "adapter", {"bottleneck": 64}),
    ("gpt2-large", "adapter", {"bottleneck": 32, "train_layer_norms": True}),
    ("smollm2-135m", "adapter", {"bottleneck": 16, "train_layer_norms": True}),
    ("gpt2", "bitfit", {}),
    ("gpt2-xl", "bitfit", {}),
    ("gpt2", "full", {}),
    ("smollm2-135m", "full", {}),
]


@pytest.mark.parametrize("preset,method,kwargs", CASES)
def test_real_modules_agree_with_closed_form(preset, method, kwargs):
    r = params.report(preset, method, peft.make_config(method, **kwargs))
    assert r["trainable"] == r["closed_form_trainable"]
    assert r["percent"] == pytest.approx(100 * r["trainable"] / r["total"])


@pytest.mark.parametrize("preset", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "smollm2-135m"])
def test_base_totals(preset):
    config = preset_config(preset)
    total = peft.count_parameters(build_model(config, device="meta"))[1]
    positions = getattr(config, "n_positions", 0)
    assert total == params.base_count(model_spec(config), config.vocab_size, positions)


def test_hand_worked_values():
    gpt2 = model_spec(preset_config("gpt2"))
    # LoRA r=8 on GPT-2's fused c_attn (768 -> 2304): 12 layers * 8 * (768 + 2304) = 294,912
    assert params.lora_count(gpt2, 8) == 294_912
    # adapters m=64: 12 * 2 * (2*64*768 + 64 + 768) = 12 * 2 * 99,136 = 2,379,264
    assert params.adapter_count(gpt2, 64) == 2_379_264
    # BitFit: 12 * (3*768 + 768 + 3072 + 768 + 2*768) + 768 = 12 * 8448 + 768 = 102,144
    assert params.bitfit_count(gpt2) == 102_144
    # prefix l=10: 12 layers * 10 * 2 * 768 = 184,320
    assert params.prefix_count(gpt2, 10) == 184_320
    # GPT-2 small has 124,439,808 parameters (tied head)
    assert params.base_count(gpt2, 50257, 1024) == 124_439_808


def test_percent_matches_peft_for_lora():
    peft_lib = pytest.importorskip("peft")
    for preset, targets in [("gpt2", ["c_attn"]), ("smollm2-135m", ["q_proj", "k_proj", "v_proj"])]:
        model = build_model(preset_config(preset), device="meta")
        theirs = peft_lib.get_peft_model(model, peft_lib.LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                                     fan_in_fan_out=preset == "gpt2"))  # Conv1D
        trainable, total = theirs.get_nb_trainable_parameters()
        ours = params.report(preset, "lora", peft.make_config("lora", r=16))
        assert (ours["trainable"], ours["total"]) == (trainable, total)


def test_shapes_under_grouped_query_attention():
    spec = model_spec(preset_config("smollm2-135m"))
    # 9 query heads and 3 key/value heads of 64: W_k and W_v are 576 x 192, not 576 x 576
    assert params.projection_shapes(spec)["k_proj"] == params.matrix_shapes(spec)["k"] == (576, 192)
    # LoRA r=16 on q, k, v: 30 * 16 * ((576 + 576) + 2 * (576 + 192)) = 1,290,240, by module or by short name
    assert params.lora_count(spec, 16) == params.lora_count(spec, 16, ["q", "k", "v"]) == 1_290_240


def test_closed_form_rejects_unknown_target():
    with pytest.raises(LmlabError):
        params.lora_count(model_spec(preset_config("gpt2")), 8, ["q_proj"])
