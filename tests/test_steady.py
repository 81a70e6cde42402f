"""Steady under load (issue #15 §6): a 500-step run keeps its resident memory flat (nothing grows
with the steps: metrics, caches, the progress bar), and a sweep of 6 runs leaves no process,
thread, temporary folder or half-written entry behind."""

import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from lmlab import engine
from lmlab.finetune import FinetuneConfig

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def rss_mb() -> float:
    """This process's resident set size (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from /proc: no psutil needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # ended meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def leftovers(folder: Path) -> list[str]:
    """What an interrupted or careless write leaves: temporaries, swapped-out or partial folders."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*")
                  if p.name.endswith((".tmp", ".old", ".partial")) or ".rank-optimizers." in p.name
                  or p.name.startswith(".write-test-"))


@pytest.fixture
def one_thread():
    """One intra-op thread: a tiny model's ops are faster so on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_500_steps_keep_resident_memory_flat(tiny_model_dir, toy_dataset, tmp_path, monkeypatch, one_thread,
                                             capsys):
    """RSS sampled at every metrics row (each 10 steps) of a 500-step LoRA run with an evaluation
    and a checkpoint every 50 steps and the progress bar drawn (to /dev/null, as on a terminal):
    the median of steps 400-500 is within 8 MiB of the median of steps 100-200."""
    from tqdm import tqdm

    from lmlab.finetune import run

    samples, log_row = {}, engine._log_row

    def sampled(out, row, accelerator):
        log_row(out, row, accelerator)
        samples[row["step"]] = rss_mb()

    monkeypatch.setattr(engine, "_log_row", sampled)
    with open(os.devnull, "w") as devnull:
        monkeypatch.setattr(engine, "_progress", lambda total, initial, enabled, desc: tqdm(
            total=total, initial=initial, desc=desc, file=devnull, mininterval=0))
        summary = run(FinetuneConfig(model=tiny_model_dir, dataset=toy_dataset, out_dir=str(tmp_path / "run"),
                                     max_iters=500, eval_interval=50, batch_size=2, eval_limit=4, max_length=32,
                                     rank=2, json=True))
    assert summary["steps"] == 500 and len(samples) == 50
    early = statistics.median(v for s, v in samples.items() if 100 < s <= 200)
    late = statistics.median(v for s, v in samples.items() if s > 400)
    with capsys.disabled():
        print(f"\nRSS MiB: step 10 {samples[10]:.1f}, median 100-200 {early:.1f}, median 400-500 {late:.1f}, "
              f"max {max(samples.values()):.1f}, {summary['seconds']:.1f} s for 500 steps")
    assert late - early < 8, f"resident memory grew {late - early:.1f} MiB from steps 100-200 to 400-500"


def test_a_sweep_of_six_runs_leaves_nothing_behind(tiny_model_dir, toy_dataset, tmp_path, monkeypatch, one_thread):
    """Six 1-step runs (with their accuracy passes): afterwards no child process, the same threads
    as before, an empty temporary folder, and no temporary entry in the sweep folder."""
    from lmlab import sweep

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # tempfile.gettempdir(), for this process
    monkeypatch.setenv("TMPDIR", str(scratch))  # and for any process it starts
    runs = sweep.expand([{"method": "lora", "rank": [1, 2, 3], "lr": [1e-3, 2e-3]}],
                        {"model": tiny_model_dir, "dataset": toy_dataset, "max_iters": 1, "batch_size": 2,
                         "eval_limit": 2, "max_length": 32, "no_progress": True, "json": True})
    assert len(runs) == 6
    threads = {t.ident for t in threading.enumerate()}
    kids = children(os.getpid())
    rows = sweep.run(runs, tmp_path / "sweep", accuracy_limit=2)
    assert len(rows) == 6
    assert children(os.getpid()) == kids
    assert {t.ident for t in threading.enumerate()} == threads, threading.enumerate()
    assert list(scratch.iterdir()) == []
    assert leftovers(tmp_path / "sweep") == []
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.name.startswith(".")) == [".lmlab.lock"]
