"""``--config FILE`` (TOML, YAML, JSON; a run's run.json): keys are flag names, flags win, unknown
keys and bad values are one error naming them, and a run's record repeats the run."""

import json

import pytest

from lmlab.cli import build_parser, main
from lmlab.cli._config import apply_config


def parsed(argv):
    parser = build_parser()
    apply_config(parser, argv)
    return parser.parse_args(argv)


@pytest.mark.parametrize("name,text", [
    ("c.toml", 'lr = 0.001\nmax-iters = 7\nmethod = "adapter"\nno_progress = true\ntemplate = "T: {text}\\nS:"\n'),
    ("c.yaml", 'lr: 0.001\nmax_iters: 7\nmethod: adapter\nno-progress: true\ntemplate: "T: {text}\\nS:"\n'),
    ("c.json", '{"--lr": 0.001, "max_iters": 7, "method": "adapter", "no_progress": true, "template": "T: {text}\\nS:"}'),
])
def test_keys_are_flag_names_in_every_format(name, text, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    args = parsed(["finetune", "--config", str(path)])
    assert (args.lr, args.max_iters, args.method, args.no_progress) == (0.001, 7, "adapter", True)
    assert args.template == "T: {text}\nS:"


def test_flags_on_the_command_line_win(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("lr = 0.001\nmax_iters = 7\n")
    args = parsed(["finetune", "--config", str(path), "--lr", "0.5"])
    assert (args.lr, args.max_iters) == (0.5, 7)


def test_each_config_command(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("split: validation\nlimit: 5\nrun: runs/x\n")
    args = parsed(["evaluate", "--config", str(path)])
    assert (args.split, args.limit, args.checkpoint) == ("validation", 5, "runs/x")
    path.write_text("run: ['method=lora rank=4', 'method=full']\naccuracy_limit: 9\n")
    args = parsed(["sweep", "--config", str(path)])
    assert args.run == ["method=lora rank=4", "method=full"] and args.accuracy_limit == 9
    path.write_text("data: pairs.jsonl\nbeta: 0.2\n")  # --data is required: the file gives it
    args = parsed(["dpo", "--config", str(path)])
    assert (args.data, args.beta) == ("pairs.jsonl", 0.2)


@pytest.mark.parametrize("text,message", [
    ("lr = 0.001\nlearning_rate = 0.1\n", "unknown option 'learning_rate' for lmlab finetune"),
    ("max_iters = 0\n", "max_iters: expected a positive integer"),
    ("method = \"lorra\"\n", "method must be one of lora, adapter"),
    ("resume = \"yes\"\n", "resume is a switch"),
    ("lr = [1, 2]\n", "lr takes one value"),
    ("lr = ", "not valid TOML"),
    ("[[x]]\n", "unknown option 'x'"),
])
def test_bad_config_is_one_line(text, message, tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert main(["finetune", "--config", str(path), "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_missing_or_odd_config_file(tmp_path, capsys):
    assert main(["finetune", "--config", str(tmp_path / "none.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "c.ini").write_text("x=1")
    assert main(["finetune", "--config", str(tmp_path / "c.ini")]) == 2
    assert "expected a .toml, .yaml, .yml or .json" in capsys.readouterr().err


def test_run_json_repeats_the_run(tiny_model_dir, toy_dataset, tmp_path, capsys):
    """The resolved settings a run records are a config: the same run again, to the same losses."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["finetune", "--model", tiny_model_dir, "--dataset", str(toy_dataset), "--rank", "2",
                 "--max-iters", "2", "--eval-interval", "1", "--eval-limit", "4", "--lr", "1e-2",
                 "--template", r"R: {text}\nS:", "--out-dir", str(first), "--no-progress", "--json"]) == 0
    capsys.readouterr()
    assert main(["finetune", "--config", str(first / "run.json"), "--out-dir", str(second), "--json"]) == 0
    capsys.readouterr()
    recorded = [json.loads((d / "run.json").read_text())["options"] for d in (first, second)]
    assert {**recorded[0], "out_dir": None} == {**recorded[1], "out_dir": None}
    losses = [[row.get("val_loss") for row in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
              for d in (first, second)]
    assert losses[0] == losses[1] and any(v is not None for v in losses[0])


def test_yaml_on_and_off_are_choices_not_booleans(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("chat-template: off\n")
    assert parsed(["finetune", "--config", str(path)]).chat_template == "off"
