"""One run per folder (issue #15 §3): a second finetune, dpo or sweep on a folder in use is refused
in one line; the lock of a SIGKILLed run is not stale (the kernel drops an flock with its holder),
and the next run takes the folder over. Only rank 0 of a torchrun / accelerate run locks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lmlab.checkpoint import LOCK_FILE, check_out_dir, lock_out_dir, out_dir_lock, unlock_out_dir
from lmlab.cli import main
from lmlab.engine import TrainConfig

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock: no out-dir lock on Windows")

# The first run, held still once it has its folder: the model load (after the lock) never returns.
BLOCKED = """
import sys, time
import lmlab.finetune

def hold(*args, **kwargs):
    time.sleep(600)

lmlab.finetune.load_for_training = hold
from lmlab.cli import main
sys.exit(main(sys.argv[1:]))
"""

FT = ["--max-iters", "2", "--eval-interval", "2", "--batch-size", "8", "--rank", "2", "--eval-limit", "4",
      "--no-progress", "--json"]


def start_blocked(tmp_path, argv, locked):
    """Start ``lmlab argv`` in another process and wait until it holds ``locked``."""
    script = tmp_path / "blocked.py"
    script.write_text(BLOCKED)
    proc = subprocess.Popen([sys.executable, str(script), *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (locked / LOCK_FILE).exists() and f"pid {proc.pid} " in (locked / LOCK_FILE).read_text():
            return proc
        if proc.poll() is not None:
            pytest.fail(f"the first run ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the first run did not take its folder within 120 s")


def second(argv):
    """``lmlab argv`` in a fresh process: (exit status, stderr lines)."""
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stderr.strip().splitlines()


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def test_second_finetune_or_dpo_is_refused_and_a_killed_run_is_taken_over(tiny_model_dir, toy_dataset, tmp_path,
                                                                          capsys):
    out = tmp_path / "run"
    finetune = ["finetune", "--model", tiny_model_dir, "--dataset", toy_dataset, "--out-dir", out, *FT]
    first = start_blocked(tmp_path, finetune, out)
    try:
        status, err = second(finetune)
        assert status == 2 and len(err) == 1, err
        assert err[0].startswith("lmlab: error: ") and "in use by another lmlab run" in err[0]
        assert f"pid {first.pid} on " in err[0]
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}) + "\n")
        status, err = second(["dpo", "--model", tiny_model_dir, "--data", pairs, "--out-dir", out, "--json"])
        assert status == 2 and len(err) == 1 and "in use by another lmlab run" in err[0], err
    finally:
        kill(first)
    assert (out / LOCK_FILE).read_text().strip()  # SIGKILL: the holder's note stays, its lock does not
    capsys.readouterr()
    assert main([str(a) for a in finetune]) == 0
    assert f"its last run (pid {first.pid}) was killed; this run takes the folder over" in capsys.readouterr().err
    assert (out / "last").is_dir()


def test_second_sweep_is_refused_and_a_killed_sweep_is_taken_over(tiny_model_dir, toy_dataset, tmp_path, capsys):
    from lmlab.sweep import expand, run_dir

    out = tmp_path / "sweep"
    common = f"model={tiny_model_dir} dataset={toy_dataset} max_iters=1 eval_interval=1 batch_size=8 no_progress=true"
    sweep = ["sweep", "--run", "method=lora rank=2 alpha=4", "--common", common, "--out-dir", out, "--eval-limit", "4",
             "--accuracy-limit", "4", "--json"]
    (only,) = expand([{"method": "lora", "rank": 2, "alpha": 4}], {
        "model": tiny_model_dir, "dataset": toy_dataset, "max_iters": 1, "eval_interval": 1, "batch_size": 8,
        "no_progress": True, "eval_limit": 4})
    child = run_dir(out, only)
    first = start_blocked(tmp_path, sweep, child)  # the sweep holds its folder, then its run's
    try:
        assert f"pid {first.pid} " in (out / LOCK_FILE).read_text()
        status, err = second(sweep)
        assert status == 2 and len(err) == 1 and "in use by another lmlab run" in err[0], err
        status, err = second(["finetune", "--model", tiny_model_dir, "--dataset", toy_dataset, "--out-dir", child,
                              *FT])
        assert status == 2 and len(err) == 1 and "in use by another lmlab run" in err[0], err
    finally:
        kill(first)
    capsys.readouterr()
    assert main([str(a) for a in sweep]) == 0
    captured = capsys.readouterr()
    assert "was killed; this run takes the folder over" in captured.err
    assert [r["run"] for r in json.loads(captured.out.strip().splitlines()[-1])] == [child.name]
    assert not (out / LOCK_FILE).read_text() and not (child / LOCK_FILE).read_text()  # released: ended cleanly


def test_lock_is_reentrant_in_one_process_and_released(tmp_path):
    assert lock_out_dir(tmp_path) is True
    assert lock_out_dir(tmp_path) is False  # finetune.run and the engine both check the folder
    check_out_dir(TrainConfig(out_dir=str(tmp_path)))
    assert f"pid {os.getpid()} " in (tmp_path / LOCK_FILE).read_text()
    unlock_out_dir(tmp_path)
    assert (tmp_path / LOCK_FILE).read_text() == ""  # ended cleanly: the next run says nothing
    with out_dir_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text()
        with out_dir_lock(tmp_path):  # nested: the outer one keeps it
            pass
        assert (tmp_path / LOCK_FILE).read_text()
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_only_rank_zero_locks(tmp_path, monkeypatch):
    """Under torchrun / accelerate launch every rank checks the shared out-dir; rank 0 holds the
    lock for the run (tests/test_train.py::test_two_processes runs 2 ranks on one folder)."""
    monkeypatch.setenv("RANK", "1")
    assert lock_out_dir(tmp_path) is False
    check_out_dir(TrainConfig(out_dir=str(tmp_path)))
    assert not (tmp_path / LOCK_FILE).exists()
