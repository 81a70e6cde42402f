"""Sweeps: grid expansion, TOML grids, and a tiny end-to-end sweep that resumes by skipping."""

import json

import pytest

from lmlab import LmlabError
from lmlab.cli import main
from lmlab.sweep import expand, load_grid, parse_grid_args, run_name


def test_expand_products_and_alpha_multiple():
    runs = expand([{"method": "lora", "rank": [16, 128, 196], "alpha": "4r"},
                   {"method": "lora", "rank": 16, "alpha": [64, 256]}, {"method": "full", "lr": 5e-5}],
                  common={"max_iters": 10})
    # r=16, alpha=64 appears in both LoRA blocks and runs once
    assert [run_name(r) for r in runs] == ["lora-r16-a64", "lora-r128-a512", "lora-r196-a784",
                                           "lora-r16-a256", "full-lr5e-05"]
    assert all(r["max_iters"] == 10 for r in runs)


def test_bad_alpha_is_an_error():
    with pytest.raises(LmlabError, match="multiple of r"):
        expand([{"rank": 16, "alpha": "four"}])


def test_command_line_blocks():
    blocks = parse_grid_args(["method=lora rank=16,128 alpha=4r; method=full lr=5e-5", "no_progress=true"])
    assert blocks == [{"method": "lora", "rank": [16, 128], "alpha": "4r"}, {"method": "full", "lr": 5e-5},
                      {"no_progress": True}]


def test_toml_grid(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('[common]\nmax_iters = 3\n[[run]]\nmethod = "lora"\nrank = [4, 8]\nalpha = "2r"\n')
    assert [run_name(r) for r in load_grid(path)] == ["lora-r4-a8", "lora-r8-a16"]
    path.write_text("[common]\n")
    with pytest.raises(LmlabError, match=r"\[\[run\]\]"):
        load_grid(path)
    path.write_text("not = [toml")
    with pytest.raises(LmlabError, match="not valid TOML"):
        load_grid(path)


def test_tiny_sweep_end_to_end_and_skip_on_rerun(tiny_model_dir, small_dataset, tmp_path, capsys):
    argv = ["sweep", "--run", "method=lora rank=2,4 alpha=2r", "--out-dir", str(tmp_path),
            "--common", (f"model={tiny_model_dir} dataset={small_dataset} max_iters=2 eval_interval=1 "
                        "batch_size=8 no_progress=true"), "--eval-limit", "8", "--json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["run"] for r in rows] == ["lora-r2-a4", "lora-r4-a8"]
    assert all(0 <= r["acc_best"] <= 1 and r["trainable"] > 0 for r in rows)
    assert (tmp_path / "results.md").read_text().count("lora-r") == 2
    assert (tmp_path / "results.csv").read_text().startswith("run,method,rank,alpha")
    assert (tmp_path / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert main(argv) == 0
    assert capsys.readouterr().err.count("done before, skipped") == 2
