"""Sweeps: grid expansion, TOML grids, run identity (every setting that changes the experiment
changes the folder), folder names that stay inside the sweep folder, --dry-run, and a tiny
end-to-end sweep that resumes by skipping."""

import dataclasses
import json
import sys

import pytest

from lmlab import LmlabError
from lmlab.cli import build_parser, main
from lmlab.finetune import FinetuneConfig
from lmlab.sweep import NOT_IDENTITY, expand, load_grid, parse_grid_args, run_dir, run_id, run_name


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
    assert [r["run"].rsplit("-", 1)[0] for r in rows] == ["lora-r2-a4", "lora-r4-a8"]
    assert all((tmp_path / r["run"] / "result.json").exists() for r in rows)
    assert all(0 <= r["acc_best"] <= 1 and r["trainable"] > 0 for r in rows)
    run_info = json.loads((tmp_path / rows[0]["run"] / "run.json").read_text())
    assert run_info["eval_limit"] == 8  # --eval-limit: validation examples per pass, as in finetune
    evaluated = json.loads((tmp_path / rows[0]["run"] / "result.json").read_text())["eval_best"]
    assert evaluated["n"] == 16  # the accuracy columns: the whole test split (no --accuracy-limit)
    table = (tmp_path / "results.md").read_text()
    assert table.count("lora-r") == 2
    first = evaluated
    assert f"{100 * first['correct'] / first['n']:.1f} % ({first['correct']}/{first['n']})" in table  # one way
    assert (tmp_path / "results.csv").read_text().startswith("run,method,rank,alpha")
    assert (tmp_path / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert main(argv) == 0
    assert capsys.readouterr().err.count("done before, skipped") == 2


# --- run identity ---------------------------------------------------------------------------------

# Fields that say how and where a run goes, not what it is: changing one finds the same folder.
HOW_AND_WHERE = {"out_dir", "resume", "report_to", "no_progress", "json", "device", "dtype"}


def _other(field: dataclasses.Field, value):
    """A value of ``field``'s type that differs from ``value``."""
    kind = str(field.type)
    if kind.startswith("bool"):
        return not value
    if kind.startswith("int"):
        return (value or 0) + 3
    if kind.startswith("float"):
        return (value or 0.0) + 0.25
    return f"{value}-other" if value else "other"


def test_every_setting_that_changes_the_experiment_changes_the_folder():
    base = {"method": "lora", "rank": 4, "alpha": 16.0, "max_iters": 10}
    defaults = FinetuneConfig(**base)
    assert NOT_IDENTITY == HOW_AND_WHERE
    for field in dataclasses.fields(FinetuneConfig):
        changed = {**base, field.name: _other(field, getattr(defaults, field.name))}
        if field.name in ("out_dir", "resume"):
            continue  # the sweep's own: a grid may not set them (test_grid_cannot_choose_folders)
        same = run_id(changed) == run_id(base)
        assert same == (field.name in HOW_AND_WHERE), f"{field.name}: {run_id(changed)} vs {run_id(base)}"


def test_a_setting_given_at_its_default_is_the_same_run():
    default = FinetuneConfig()
    assert run_id({"method": "lora", "seed": default.seed, "lr": default.lr}) == run_id({"method": "lora"})
    assert run_id({"method": "lora", "rank": 16, "alpha": 64}) == run_id({"method": "lora", "rank": 16, "alpha": 64.0})


def test_runs_that_differ_only_in_seed_template_or_data_all_run():
    for key, values in (("seed", [1, 2, 3]), ("template", ["Review: {text}\nSentiment:", "{text} ->"]),
                        ("dataset", ["data/a", "data/b"]), ("lora_dropout", [0.0, 0.1])):
        runs = expand([{"method": "lora", "rank": 4, "alpha": 8, key: values}])
        assert len(runs) == len(values) and len({run_id(r) for r in runs}) == len(values), key
        assert {run_name(r) for r in runs} == {"lora-r4-a8"}  # the readable part alone would collide


# --- folders stay inside the sweep folder ---------------------------------------------------------


@pytest.mark.parametrize("method", ["../../etc", "/abs/path", "a/b", "a\\b", "..", ".hidden", "x\x00y"])
def test_run_folders_stay_inside_the_sweep_folder(method, tmp_path):
    run = {"method": method, "rank": "../../r", "lr": 1e-4}
    folder = run_dir(tmp_path / "sweep", run)
    assert folder.parent == tmp_path / "sweep" and not folder.name.startswith(".")
    assert "/" not in folder.name and "\\" not in folder.name and ".." not in folder.name.split("-")


@pytest.mark.parametrize("name", ["..", ".", "", "/etc", "a/b", "a\\b", ".hidden", "../x"])
def test_child_dir_refuses_names_that_leave_the_folder(name, tmp_path):
    from lmlab.checkpoint import child_dir

    with pytest.raises(LmlabError, match="not a plain folder name"):
        child_dir(tmp_path, name)


@pytest.mark.parametrize("key", ["out_dir", "resume"])
def test_grid_cannot_choose_folders(key, tmp_path, capsys):
    with pytest.raises(LmlabError, match=f"cannot set {key}"):
        expand([{"method": "lora", key: "/tmp/elsewhere"}])
    assert main(["sweep", "--run", f"method=lora {key}=../../x", "--out-dir", str(tmp_path), "--dry-run"]) == 2
    assert f"cannot set {key}" in capsys.readouterr().err


# --- dry run, options ------------------------------------------------------------------------------


def test_dry_run_lists_runs_and_folders_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--run", "method=lora rank=2 seed=1,2", "--run", "method=full lr=5e-5", "--out-dir", str(out),
            "--dry-run"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("3 runs in ") and "nothing was run" in lines[-1]
    assert all(line.startswith("new ") and str(out) in line for line in lines[:3])
    assert not out.exists()
    assert main([*argv, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert [p["state"] for p in planned] == ["new"] * 3 and len({p["folder"] for p in planned}) == 3
    assert planned[0]["settings"] == {"method": "lora", "rank": 2, "seed": 1}
    done = out / planned[1]["run"]
    done.mkdir(parents=True)
    (done / "result.json").write_text("{}")
    assert main([*argv, "--json"]) == 0
    assert [p["state"] for p in json.loads(capsys.readouterr().out)] == ["new", "done", "new"]


def test_eval_limit_means_validation_examples_and_accuracy_limit_is_its_own(tmp_path, capsys):
    sweep = build_parser().parse_args(["sweep", "--run", "method=lora"])
    assert sweep.eval_limit is None and sweep.accuracy_limit is None  # finetune's 300; the whole split
    argv = ["sweep", "--run", "method=lora rank=2", "--run", "method=lora rank=4 eval_limit=9", "--eval-limit", "7",
            "--out-dir", str(tmp_path), "--dry-run", "--json"]
    assert main(argv) == 0
    assert [p["settings"]["eval_limit"] for p in json.loads(capsys.readouterr().out)] == [7, 9]  # the grid wins
    grid = tmp_path / "grid.toml"
    grid.write_text('[common]\nmax_iters = 3\n[[run]]\nmethod = "lora"\nrank = [4, 8]\n')
    assert main(["sweep", "--grid", str(grid), "--eval-limit", "5", "--out-dir", str(tmp_path), "--dry-run",
                 "--json"]) == 0
    assert [p["settings"]["eval_limit"] for p in json.loads(capsys.readouterr().out)] == [5, 5]
    assert main(["sweep", "--grid", str(grid), "--common", "seed=1", "--out-dir", str(tmp_path)]) == 2
    assert "[common]" in capsys.readouterr().err


def test_toml_grid_without_tomllib(tmp_path, monkeypatch):
    """Python 3.10 has no tomllib: tomli (the same parser) if installed, else one line naming it."""
    import tomllib

    path = tmp_path / "grid.toml"
    path.write_text('[[run]]\nmethod = "lora"\nrank = [4, 8]\nalpha = "2r"\n')
    monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib: ImportError
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    assert [run_name(r) for r in load_grid(path)] == ["lora-r4-a8", "lora-r8-a16"]
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(LmlabError, match="pip install tomli"):
        load_grid(path)


def test_settings_at_their_default_stay_out_of_the_identity():
    """A setting lmlab adds later (at its default) leaves existing runs' folders as they were."""
    from lmlab import sweep

    assert sweep.identity({"method": "lora"}) == {}
    assert sweep.identity({"method": "lora", "rank": 16}) == {"rank": 16, "alpha": 64.0}
    assert sweep.run_id({"method": "lora", "rank": 16}) == sweep.run_id({"method": "lora", "rank": 16, "alpha": 64})
    assert sweep.run_id({"method": "lora", "use_dora": False}) == sweep.run_id({"method": "lora"})
