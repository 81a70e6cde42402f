"""Calculators: each quantity against a value worked out by hand in the comments."""

import json

import pytest

from lmlab import LmlabError, peft
from lmlab.calc import memory, params, scaling
from lmlab.calc.mlp import mlp_counts, parse_widths
from lmlab.cli import main

FIT = scaling.ChinchillaFit()


def test_loss_and_single_factor_laws():
    # N = D = 1e9: A/N^a = 406.4 / 10^(9*0.34) = 406.4 / 10^3.06 = 406.4 / 1148.15 = 0.353957
    #              B/D^b = 410.7 / 10^(9*0.28) = 410.7 / 10^2.52 = 410.7 / 331.131 = 1.240294
    assert scaling.loss_of_params(1e9) == pytest.approx(0.353957, rel=1e-5)
    assert scaling.loss_of_tokens(1e9) == pytest.approx(1.240294, rel=1e-5)
    assert scaling.loss(1e9, 1e9) == pytest.approx(1.69 + 0.353957 + 1.240294, rel=1e-5)
    # C = 6 N D: 6 * 70e9 * 1.4e12 = 5.88e23 (Chinchilla)
    assert scaling.compute(70e9, 1.4e12) == pytest.approx(5.88e23)


def test_compute_optimal_split():
    # x = b/(a+b) = 0.28/0.62 = 0.451613, y = 0.34/0.62 = 0.548387
    x, y = scaling.exponents()
    assert (x, y) == (pytest.approx(0.451613, rel=1e-5), pytest.approx(0.548387, rel=1e-5))
    # G = (0.34*406.4 / (0.28*410.7))^(1/0.62) = (138.176/114.996)^1.612903 = 1.2015722^1.612903 = exp(0.183630/0.62) = 1.344711
    # C = 6e20: C/6 = 1e20, N = G * 1e20^x = 1.344711 * 10^9.032258 = 1.4484e9; D = 1e20^y / G = 10^10.967742 / G
    n, d = scaling.compute_optimal(6e20)
    assert n == pytest.approx(1.344711 * 10 ** (20 * 0.28 / 0.62), rel=1e-5)
    assert d == pytest.approx(10 ** (20 * 0.34 / 0.62) / 1.344711, rel=1e-5)
    assert 6 * n * d == pytest.approx(6e20)  # the split spends exactly the budget
    # and it is the minimum along the budget line: moving N either way costs loss
    for factor in (0.8, 1.25):
        assert scaling.loss(n * factor, d / factor) > scaling.loss(n, d)
    # balanced D for the optimal N is the optimal D (alpha A / N^alpha = beta B / D^beta)
    assert scaling.balanced_tokens(n) == pytest.approx(d, rel=1e-6)


@pytest.mark.parametrize("extra,factor", [(0, 1.0), (1, 1.5), (2, 1.75), (3, 1.875)])
def test_effective_tokens(extra, factor):
    # passes worth 1, 1/2, 1/4, ...: D' = 2(1 - 2^-(x+1)) D; x = 1: 2 * 3/4 = 1.5
    assert scaling.effective_tokens(1e9, extra) == pytest.approx(factor * 1e9)


def test_extra_epochs_for_a_target_loss():
    # N = 1e9 (A/N^a = 0.353957), D = 1e10: target 2.6 leaves B/D'^b = 2.6 - 1.69 - 0.353957 = 0.556043,
    # D' = (410.7 / 0.556043)^(1/0.28) = 738.612^3.571429 = 1.7552e10, ratio 1.7552,
    # x = -log2(1 - 1.7552/2) - 1 = -log2(0.1224) - 1 = 3.0304 - 1 = 2.0304
    r = scaling.extra_epochs_for_loss(1e9, 1e10, 2.6)
    assert r["extra_epochs"] == pytest.approx(2.0304, abs=2e-3)
    assert r["extra_compute"] == pytest.approx(6 * 1e9 * 1e10 * r["extra_epochs"])
    assert r["loss"] == pytest.approx(2.6, rel=1e-9)
    assert scaling.extra_epochs_for_loss(1e9, 1e10, 3.0)["extra_epochs"] == 0  # one pass already suffices
    with pytest.raises(LmlabError, match="saturates at 2D"):
        scaling.extra_epochs_for_loss(1e9, 1e10, 2.3)
    with pytest.raises(LmlabError, match="even infinite data"):
        scaling.extra_epochs_for_loss(1e9, 1e10, 2.0)


def test_optimal_epochs_beats_its_neighbours():
    c, d = 1e21, 1e10
    best = scaling.optimal_epochs(c, d)
    assert 6 * best["params"] * d * (1 + best["extra_epochs"]) == pytest.approx(c)

    def at(x):
        return scaling.loss(c / (6 * d * (1 + x)), scaling.effective_tokens(d, x))

    assert best["loss"] == pytest.approx(at(best["extra_epochs"]))
    for dx in (-0.05, 0.05):
        assert at(best["extra_epochs"] + dx) >= best["loss"]


def test_gpt3_lora_storage():
    # LoRA paper: r = 4 on q, v of GPT-3 175B: 96 layers * 2 matrices * 4 * (12288 + 12288) = 18,874,368
    # parameters = 37,748,736 bytes in fp16; 100 tasks: 350 GB base + 3.77 GB of adapters
    s = memory.storage(memory.model_shape("gpt3-175b"), 100, ("q", "v"), 4)
    assert s["per_task_params"]["lora"] == 18_874_368
    assert s["per_task_bytes"]["lora"] == 37_748_736
    assert s["total_bytes"]["full"] == 100 * 350e9  # 35 TB: no shared base
    assert s["total_bytes"]["lora"] == 350e9 + 100 * 37_748_736
    assert s["total_bytes_without_base"]["lora"] == 100 * 37_748_736
    # fine-tuning W_q and W_v only: 96 * 2 * 12288^2 = 28,991,029,248 parameters per task
    assert s["per_task_params"]["matrices"] == 28_991_029_248
    # fc1 of GPT-2: 768 x 3072
    assert memory.matrix_params(memory.model_shape("gpt2"), ("fc1",)) == 12 * 768 * 3072


def test_grouped_query_attention():
    """SmolLM2-135M has 9 query heads and 3 key/value heads of 64: W_k and W_v are 576 x 192."""
    shape = memory.model_shape("smollm2-135m")
    # LoRA r=16 on q, k, v: 30 layers * 16 * ((576 + 576) + 2 * (576 + 192)) = 1,290,240
    lora = memory.lora_params(shape, ("q", "k", "v"), 16)
    assert lora == 1_290_240
    assert lora == params.report("smollm2-135m", "lora", peft.make_config("lora", r=16))["trainable"]
    # fine-tuning q, k, v only: 30 * (576 * 576 + 2 * 576 * 192) = 16,588,800, the Linear weights themselves
    from lmlab.models import build_model, preset_config

    model = build_model(preset_config("smollm2-135m"), device="meta")
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("q_proj.weight", "k_proj.weight",
                                                                                 "v_proj.weight")))
    assert memory.matrix_params(shape, ("q", "k", "v")) == weights == 16_588_800
    assert shape.params == sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.parametrize("model,target,modules,rank", [  # memory's --target, params' --target (peft's names)
    ("gpt2", "c_attn", ("c_attn",), 8),
    ("gpt2", "o,fc1,fc2", ("attn.c_proj", "c_fc", "mlp.c_proj"), 4),
    ("gpt2-medium", "c_attn,c_fc", ("c_attn", "c_fc"), 4),
    ("smollm2-135m", "q,k,v", ("q_proj", "k_proj", "v_proj"), 16),
    ("smollm2-135m", "q,v,down", ("q_proj", "v_proj", "down_proj"), 8),
    ("smollm2-135m-instruct", "q_proj,v_proj", ("q_proj", "v_proj"), 2),
    ("tiny-llama", "q,k,v,o,gate,up,down", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"), 4),
    ("gpt3-175b", "c_attn", ("c_attn",), 4),
    ("llama-7b", "q,v", ("q_proj", "v_proj"), 4),
])
def test_memory_and_params_agree(model, target, modules, rank):
    """One source of shapes: memory's LoRA count is what params counts on real modules (meta device)."""
    shape = memory.model_shape(model)
    r = params.report(model, "lora", peft.make_config("lora", r=rank, target_modules=modules))
    assert memory.lora_params(shape, memory.parse_matrices(target), rank) == r["trainable"] == r["closed_form_trainable"]
    if model != "gpt3-175b":  # GPT-3: the paper's 175e9, not the 174.6e9 its shapes count
        assert shape.params == r["total"] - r["trainable"]


def test_rank_for_budget():
    # 400 GB - 350 GB base = 50 GB for 100 adapters; one rank of q,v = 96*2*24576 = 4,718,592 params = 9,437,184 B,
    # times 100 tasks = 943,718,400 B per rank: floor(50e9 / 943,718,400) = 52
    gpt3 = memory.model_shape("gpt3-175b")
    assert memory.rank_for_budget(gpt3, 100, ("q", "v"), 400e9) == 52
    with pytest.raises(LmlabError, match="does not fit even rank 1"):
        memory.rank_for_budget(gpt3, 100, ("q", "v"), 300e9)


@pytest.mark.parametrize("text,value", [("350GB", 350e9), ("1.5 TiB", 1.5 * 2**40), ("4e9", 4e9), ("12kb", 12e3)])
def test_parse_bytes(text, value):
    assert memory.parse_bytes(text) == pytest.approx(value)


@pytest.mark.parametrize("method,bottleneck,trainable,total", [
    # widths 1024 -> 512 -> 256 -> 10: weights 524,288 + 131,072 + 2,560 = 657,920; biases 512+256+10 = 778
    ("full", None, 658_698, 658_698),
    ("bitfit", None, 778, 658_698),
    # adapters m = 16 after each layer: sum over w in (512, 256, 10) of 2*16*w + 16 + w
    # = (16,384+16+512) + (8,192+16+256) + (320+16+10) = 16,912 + 8,464 + 346 = 25,722
    ("adapter", 16, 25_722, 658_698 + 25_722),
])
def test_mlp_counts(method, bottleneck, trainable, total):
    r = mlp_counts([1024, 512, 256, 10], method, bottleneck)
    assert (r["trainable"], r["total"]) == (trainable, total)
    assert r["percent"] == pytest.approx(100 * trainable / total)


@pytest.mark.parametrize("text", ["1024", "1024,abc", "1024,-5", "0,10", ""])
def test_parse_widths_rejects(text):
    with pytest.raises(LmlabError):
        parse_widths(text)


def test_cli_json(capsys):
    assert main(["scaling", "--params", "1e9", "--tokens", "1e9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compute"] == pytest.approx(6e18) and out["loss"] == pytest.approx(1.69 + 0.353957 + 1.240294, rel=1e-5)
    assert main(["memory", "--tasks", "100", "--rank", "4", "--target", "q,v", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_task_bytes"]["lora"] == 37_748_736
    # params' flags and presets; the old spellings (--preset, --lora-rank, --matrices) still work
    new = ["memory", "--model", "smollm2-135m", "--rank", "16", "--target", "q,k,v", "--json"]
    old = ["memory", "--preset", "smollm2-135m", "--lora-rank", "16", "--matrices", "q,k,v", "--json"]
    assert main(new) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["per_task_params"]["lora"] == 1_290_240 and out["rank"] == 16 and out["matrices"] == ["q", "k", "v"]
    assert main(old) == 0
    assert json.loads(capsys.readouterr().out) == out
    assert main(["params", "--mlp", "1024,512,256,10", "--method", "bitfit", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable"] == 778


def test_cli_plot(tmp_path):
    assert main(["scaling", "--compute", "1e21", "--plot", str(tmp_path / "iso.png"), "--json"]) == 0
    assert (tmp_path / "iso.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,message", [
    (["scaling", "--params", "1e9"], "--params needs --tokens"),
    (["scaling", "--params", "abc", "--tokens", "1"], "expected a positive number"),
    (["scaling", "--params", "-5", "--tokens", "1"], "expected a positive number"),
    (["scaling", "--compute", "1e20", "--alpha", "0"], "expected a positive number"),
    (["scaling", "--params", "1e9", "--unique-tokens", "1e10", "--target-loss", "2.0"], "unreachable"),
    (["memory", "--model", "gpt5"], "unknown preset"),
    (["memory", "--preset", "gpt5"], "unknown preset"),
    (["memory", "--target", "q,x"], "unknown matrix"),
    (["memory", "--matrices", "q,x"], "unknown matrix"),
    (["memory", "--model", "gpt2", "--target", "q_proj"], "unknown matrix"),
    (["memory", "--rank", "0"], "expected a positive integer"),
    (["memory", "--tasks", "0"], "expected a positive integer"),
    (["memory", "--budget", "lots"], "not a size"),
    (["params", "--mlp", "10,x"], "integer widths"),
    (["params", "--mlp", "10,5", "--method", "prefix"], "not defined for an MLP"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    """Our errors return 2; argparse's exit 2; either way one line on stderr names the problem."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and not any("Traceback" in line for line in err)


def test_mlp_lora_counts_equal_peft():
    """LoRA on every layer of a plain MLP: what peft makes trainable on the same torch modules."""
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model

    widths = [1024, 512, 256, 10]
    mlp = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])])
    model = get_peft_model(mlp, LoraConfig(r=8, target_modules=["0", "1", "2"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    r = mlp_counts(widths, "lora", rank=8)
    assert (r["trainable"], r["total"]) == (trainable, total) == (8 * (1024 + 512 + 512 + 256 + 256 + 10), total)


def test_readme_mlp_command_runs(capsys):
    assert main(["params", "--mlp", "1024,512,256", "--json"]) == 0  # the default method, as the README writes it
    assert json.loads(capsys.readouterr().out)["trainable"] == 128 * (1024 + 512 + 512 + 256)
