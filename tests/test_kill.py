"""Killed at any moment (issue #15 §2): ``lmlab finetune``, ``lmlab sweep`` and ``lmlab prompt
--output``, SIGKILLed at seeded random moments (during a step, an evaluation, a checkpoint write,
between the two renames of a folder swap) and run again until done, end exactly where one
uninterrupted run ends; after every kill, each checkpoint folder that exists is complete.

Every run is a real process: a child forked by a small server process that imported torch,
transformers and lmlab once (a fresh interpreter spends 5-15 s importing them on a loaded 2-core
machine; a dozen would not fit the suite's time). The child runs ``lmlab.cli.main`` as ``lmlab``
does and arms one kill: at the n-th entry to a phase, a timer thread SIGKILLs the process after a
random delay (a folder swap: right after its first rename). Each phase's entry and exit goes to a
side file, which tells where the kill landed.
"""

import csv
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from lmlab.io import committed_dir, load_tensors, load_torch, read_json

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="os.fork and SIGKILL")

# The server: imports once, then per line of JSON [argv, log, kill] forks a child, prints its pid
# and then its exit code (-9: killed). Nothing here runs a torch op before the fork.
SERVER = r'''
import json, os, signal, sys, threading, traceback
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import importlib, pathlib, torch, transformers, accelerate
from transformers import AutoModelForCausalLM, AutoTokenizer
import lmlab.cli, lmlab.finetune, lmlab.train, lmlab.sweep, lmlab.evaluate, lmlab.prompting, lmlab.checkpoint
for name in ("transformers.models.llama.modeling_llama", "transformers.tokenization_python", "accelerate.utils",
             "transformers.integrations.hub_kernels", "transformers.integrations.peft", "sympy", "scipy",
             "transformers.integrations.sdpa_attention", "matplotlib.pyplot", "lmlab.plots", "lmlab.peft.lora",
             "lmlab.chat", "lmlab.sft", "safetensors.torch"):  # what a run imports (about 10 s of a child's time)
    try:
        importlib.import_module(name)
    except ImportError:
        pass
lmlab.cli.build_parser()

PHASES = {"step": ("lmlab.train", "LabelTask.loss"), "eval": ("lmlab.train", "LabelTask.evaluate"),
          "checkpoint": ("lmlab.checkpoint", "save_checkpoints"),
          "accuracy": ("lmlab.evaluate", "evaluate_checkpoint"), "strategy": ("lmlab.prompting", "run_strategy")}

def child(argv, log, kill):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1), os.dup2(fd, 2)
    torch.set_num_threads(1)
    marks, counts = open(log + ".phases", "a", buffering=1), dict.fromkeys([*PHASES, "swap", "committed"], 0)

    def arm(phase):
        counts[phase] += 1
        if kill and kill[0] == phase and kill[1] == counts[phase]:
            threading.Timer(kill[2], os.kill, (os.getpid(), signal.SIGKILL)).start()

    def marked(real, phase):
        def wrapper(*args, **kwargs):
            marks.write(f"+{phase}\n")
            arm(phase)
            result = real(*args, **kwargs)
            marks.write(f"-{phase}\n")
            return result
        return wrapper

    for phase, (module, path) in PHASES.items():
        owner = importlib.import_module(module)
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        setattr(owner, name, marked(getattr(owner, name), phase))
    rename = pathlib.Path.rename

    def swap(self, target):
        result = rename(self, target)
        # atomic_dir: "swap", the old folder moved aside and the new one not yet in place;
        # "committed", a new last/ in place and the old one not yet removed
        point = "swap" if str(target).endswith(".old") else \
            "committed" if self.name.endswith(".tmp") and pathlib.Path(target).name == "last" else None
        if point:
            marks.write(f"={point}\n")
            counts[point] += 1
            if kill and kill[0] == point and kill[1] == counts[point]:
                os.kill(os.getpid(), signal.SIGKILL)
        return result

    pathlib.Path.rename = swap
    try:
        code = lmlab.cli.main(argv)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)

for line in sys.stdin:
    argv, log, kill = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(argv, log, kill)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
'''


class Server:
    def __init__(self, folder: Path):
        self.folder, self.n = folder, 0
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def run(self, argv, kill=None) -> tuple[int, str, list[str]]:
        """(exit code, the child's output, its phase marks) of ``lmlab argv`` killed as ``kill`` says."""
        self.n += 1
        log = self.folder / f"child{self.n}.log"
        self.proc.stdin.write(json.dumps([[str(a) for a in argv], str(log), kill]) + "\n")
        self.proc.stdin.flush()
        int(self.proc.stdout.readline())  # the child's pid: it runs
        code = int(self.proc.stdout.readline())
        marks = Path(f"{log}.phases")
        return code, log.read_text(), marks.read_text().split() if marks.exists() else []

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("children"))
    yield s
    s.close()


def landed(marks: list[str], kill: list) -> str:
    """The phase a kill landed in: the innermost one entered and not left (a swap kill: between the
    swap's renames)."""
    if kill[0] in ("swap", "committed"):
        return f"checkpoint ({'between a swap' if kill[0] == 'swap' else 'after a swap'}'s renames)"
    open_ = []
    for m in marks:
        if m.startswith("+"):
            open_.append(m[1:])
        elif m.startswith("-"):
            open_.remove(m[1:])
    closed = [m[1:] for m in marks if m.startswith("-")]
    return open_[-1] if open_ else f"after {closed[-1]}" if closed else "start-up"


def same(a, b) -> bool:
    """Bit-for-bit equality of nested containers of tensors and plain values."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def loads(path: Path):
    if path.suffix == ".safetensors":
        return load_tensors(path)
    if path.suffix == ".pt":
        return load_torch(path)
    if path.suffix in (".json", ".jsonl"):
        return read_json(path) if path.suffix == ".json" else path.read_text()
    return path.read_bytes()


def assert_checkpoints_complete(out: Path, reference: Path) -> None:
    """Each checkpoint a reader would find (``committed_dir``) has the files of a finished run's,
    and each of them loads."""
    for name in ("best", "last"):
        found = committed_dir(out / name)
        if found is None:
            continue
        assert sorted(p.name for p in found.iterdir()) == sorted(p.name for p in (reference / name).iterdir()), found
        for path in found.iterdir():
            loads(path)


def leftovers(folder: Path) -> list[str]:
    """Temporary entries an interrupted write leaves: atomic_path/atomic_dir temps, swapped-out folders."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*")
                  if p.name.endswith((".tmp", ".old")) or ".rank-optimizers." in p.name)


def without(rows: list[dict], *keys: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in keys} for r in rows]


# --- finetune -------------------------------------------------------------------------------------

KILLS = 10


def test_finetune_killed_ten_times_ends_as_an_uninterrupted_run(server, tiny_model_dir, toy_dataset, tmp_path):
    """LoRA, an evaluation and a checkpoint after every step; 10 SIGKILLs (3 in steps, 2 in
    evaluations, 3 in checkpoint writes, 2 between a folder swap's renames, each at the 1st or
    2nd such moment of its process, after a random delay), each followed by a rerun (--resume once
    there is a checkpoint): the trainable weights, optimizer state, best/ and metrics.jsonl (less
    its timing column) equal one uninterrupted run's."""
    from lmlab.engine import read_metrics

    def argv(out, resume=False):
        return ["finetune", "--model", tiny_model_dir, "--dataset", toy_dataset, "--out-dir", out, "--max-iters",
                "24", "--eval-interval", "1", "--batch-size", "2", "--eval-limit", "4", "--max-length", "32",
                "--rank", "2", "--lora-dropout", "0.1", "--no-progress", "--json", *(["--resume"] if resume else [])]

    whole, out = tmp_path / "whole", tmp_path / "killed"
    code, log, _ = server.run(argv(whole))
    assert code == 0, log[-3000:]
    rng = random.Random(15)
    phases = ["step"] * 3 + ["eval"] * 2 + ["checkpoint"] * 3 + ["swap"] * 2
    rng.shuffle(phases)
    delay = {"step": 0.03, "eval": 0.02, "checkpoint": 0.05, "swap": 0}
    where, stale = Counter(), 0
    for phase in phases:
        kill = [phase, rng.randint(1, 2), rng.uniform(0, delay[phase])]
        code, log, marks = server.run(argv(out, resume=committed_dir(out / "last") is not None), kill)
        assert code == -9, f"{kill}: the run was not killed (exit {code}): {log[-3000:]}"
        where[landed(marks, kill)] += 1
        assert_checkpoints_complete(out, whole)
        stale += bool(leftovers(out))  # removed by the next run (checkpoint.clear_leftovers)
    code, log, _ = server.run(argv(out, resume=True))
    assert code == 0, log[-3000:]
    print(f"finetune kills landed: {dict(where)}; {stale} left temporaries")

    a, b = whole / "last", out / "last"
    assert same(load_tensors(a / "trainable.safetensors"), load_tensors(b / "trainable.safetensors"))
    assert same(load_torch(a / "optimizer.pt"), load_torch(b / "optimizer.pt"))  # AdamW moments and RNG state
    assert without([read_json(a / "trainer_state.json")], "seconds") == \
        without([read_json(b / "trainer_state.json")], "seconds")
    for path in (whole / "best").iterdir():
        assert path.read_bytes() == (out / "best" / path.name).read_bytes(), path.name
    assert len(read_metrics(whole)) == 24
    assert without(read_metrics(whole), "tokens_per_s") == without(read_metrics(out), "tokens_per_s")
    assert leftovers(out) == [], "a rerun leaves no temporary folder of a killed one"


def test_a_kill_after_the_final_checkpoint_leaves_nothing_behind(server, tiny_model_dir, toy_dataset, tmp_path):
    """Killed right after the last step's last/ is in place, before the folder it replaced is
    removed: the rerun has no step left to do, still removes that folder, and ends cleanly."""
    out = tmp_path / "run"
    argv = ["finetune", "--model", tiny_model_dir, "--dataset", toy_dataset, "--out-dir", out, "--max-iters", "2",
            "--eval-interval", "1", "--batch-size", "2", "--eval-limit", "4", "--max-length", "32", "--rank", "2",
            "--no-progress", "--json"]
    code, log, _ = server.run(argv, ["committed", 2, 0])
    assert code == -9, log[-3000:]
    assert leftovers(out) == [".last.old"] and read_json(out / "last" / "trainer_state.json")["step"] == 2
    code, log, _ = server.run([*argv, "--resume"])
    assert code == 0 and "resuming" in log, log[-3000:]
    assert leftovers(out) == []


# --- sweep ----------------------------------------------------------------------------------------


def test_sweep_killed_and_rerun_gives_the_uninterrupted_table(server, tiny_model_dir, toy_dataset, tmp_path):
    """Two runs of 3 steps; killed in run 1's 2nd step, in the accuracy pass of its last
    checkpoint, and in run 2's final checkpoint write (its result not yet written); rerun each
    time: results.csv (less its seconds column) equals an uninterrupted sweep's."""

    def argv(out):
        return ["sweep", "--run", "method=lora rank=2,4 alpha=2r", "--out-dir", out, "--common",
                f"model={tiny_model_dir} dataset={toy_dataset} max_iters=3 eval_interval=1 batch_size=2 "
                "max_length=32 no_progress=true", "--eval-limit", "4", "--accuracy-limit", "2", "--json"]

    def table(out):
        with open(out / "results.csv", newline="") as f:
            return without(list(csv.DictReader(f)), "seconds")

    whole, out = tmp_path / "whole", tmp_path / "killed"
    code, log, _ = server.run(argv(whole))
    assert code == 0, log[-3000:]
    rng = random.Random(6)
    where = Counter()
    for phase, n, most in (("step", 2, 0.03), ("accuracy", 2, 0.1), ("checkpoint", 3, 0.05)):
        kill = [phase, n, rng.uniform(0, most)]
        code, log, marks = server.run(argv(out), kill)
        assert code == -9, f"{kill}: not killed (exit {code}): {log[-3000:]}"
        where[landed(marks, kill)] += 1
    code, log, _ = server.run(argv(out))
    assert code == 0, log[-3000:]
    print(f"sweep kills landed: {dict(where)}")
    assert len(table(whole)) == 2 and table(out) == table(whole)
    assert leftovers(out) == [], dict(where)


# --- prompt --output ------------------------------------------------------------------------------

ROWS = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
         "answer": f"He has {i} + {i + 2} = {2 * i + 2} apples.\n#### {2 * i + 2}"} for i in range(1, 13)]


def test_prompt_output_killed_and_rerun_is_the_same_file(server, tiny_model_dir, tmp_path):
    """Three strategies; killed while generating the 2nd of them, then (rerun) while generating the
    3rd: the finished strategies are kept in OUTPUT.parts (each part complete), and the last rerun
    writes the same file as an uninterrupted run and removes the parts."""
    data = tmp_path / "gsm"
    data.mkdir()
    for split, rows in (("train", ROWS[3:]), ("test", ROWS[:3])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def argv(output):
        return ["prompt", "--model", tiny_model_dir, "--dataset", data, "--strategies", "zero-shot,instruction,few-shot",
                "--shots", "1", "--max-new-tokens", "12", "--output", output, "--json", "--no-progress"]

    whole, out = tmp_path / "whole.jsonl", tmp_path / "killed.jsonl"
    code, log, _ = server.run(argv(whole))
    assert code == 0, log[-3000:]
    rng = random.Random(7)
    where = Counter()
    for kept in (["zero-shot"], ["instruction", "zero-shot"]):
        kill = ["strategy", 2, rng.uniform(0, 0.02)]  # 3 problems x 12 tokens: longer than that
        code, log, marks = server.run(argv(out), kill)
        assert code == -9, log[-3000:]
        where[landed(marks, kill)] += 1
        parts = Path(f"{out}.parts")
        assert sorted(p.stem for p in parts.glob("*.json")) == sorted(kept) and not out.exists()
        assert all(read_json(p)["result"]["records"] for p in parts.glob("*.json"))
    code, log, _ = server.run(argv(out))
    assert code == 0, log[-3000:]
    print(f"prompt kills landed: {dict(where)}")
    assert out.read_bytes() == whole.read_bytes() and not Path(f"{out}.parts").exists()
