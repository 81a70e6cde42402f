"""Shared fixtures: tiny randomly initialised GPT-2 and Llama models (fast, deterministic, offline)."""

from pathlib import Path

import pytest
import torch

from lmlab.models import build_model, preset_config

FAMILIES = ["tiny-gpt2", "tiny-llama"]


def tiny(name: str, seed: int = 0):
    return build_model(preset_config(name), seed=seed)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).logits


def randomize(params, std: float = 0.1) -> None:
    """Give zero-initialised method weights random values so tests are not vacuous."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"  # real data beside the project (CI has it; users may not)
RT = str(SHARED / "rotten_tomatoes")


def needs_shared() -> None:
    if not (SHARED / "rotten_tomatoes" / "train.jsonl").exists():
        pytest.skip(f"needs the shared data folder {SHARED}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as a local model folder, with the real SmolLM2 tokenizer (same vocab)."""
    from transformers import AutoTokenizer

    from lmlab.models import embedded_model_dir

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny("tiny-llama").save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, toy_dataset):
    """64/16/16 rows of the real rotten_tomatoes (both classes), as a local jsonl folder; where
    ../shared/data is absent (a user's clone), the synthetic ``toy_dataset``, so nothing skips."""
    import json

    if not (SHARED / "rotten_tomatoes" / "train.jsonl").exists():
        return toy_dataset
    here = Path(RT)
    path = tmp_path_factory.mktemp("rt-small")
    for split, n in (("train", 64), ("validation", 16), ("test", 16)):
        rows = [json.loads(line) for line in (here / f"{split}.jsonl").read_text().splitlines()]
        half = len(rows) // 2  # the file lists one class, then the other
        picked = rows[: n // 2] + rows[half: half + n // 2]
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))
    return str(path)


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory):
    """A learnable sentiment set of our own (no ../shared needed): 48/16/16 rows, both classes,
    positive reviews praise and negative ones pan, in a handful of word patterns."""
    import json
    import random

    good = ["a wonderful, moving film", "great acting and a lovely story", "brilliant and funny", "i loved it"]
    bad = ["a dull, tedious mess", "terrible acting and a boring story", "awful and lifeless", "i hated it"]
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("toy")
    for split, n in (("train", 48), ("validation", 16), ("test", 16)):
        rows = [{"text": f"{rng.choice(good if label else bad)} ({split} {i})", "label": label}
                for i in range(n) for label in (i % 2,)]
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def two_processes(*command: str, timeout: int = 300):
    """Run ``command`` (``-m lmlab.cli ...`` or a script and its arguments) as 2 DDP processes on
    the CPU. torchrun sets the environment accelerate reads; ``accelerate launch --cpu
    --num_processes 2`` starts a single process on a CPU-only machine (measured), so it would test
    nothing. The run must record 2 processes in its run.json for a test to trust it."""
    import shutil
    import subprocess

    torchrun = shutil.which("torchrun")
    assert torchrun is not None, "torchrun is installed with torch"
    return subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", *command], check=False,
                          capture_output=True, text=True, timeout=timeout)


def _allowed_skips() -> list[str]:
    path = Path(__file__).with_name("allowed_skips.txt")
    lines = [line.split("|")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def pytest_sessionfinish(session, exitstatus):
    """Fail the run on a skip that tests/allowed_skips.txt does not list with its reason."""
    from fnmatch import fnmatch

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    allowed = _allowed_skips()
    unlisted = [r for r in reporter.stats.get("skipped", [])
                if not any(fnmatch(r.nodeid, pattern) for pattern in allowed)]
    if unlisted:
        reporter.ensure_newline()
        reporter.write_line(f"{len(unlisted)} skipped test(s) not listed in tests/allowed_skips.txt "
                            "(a skipped test is not a test):", red=True)
        for r in unlisted:
            reason = r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
            reporter.write_line(f"  {r.nodeid}: {reason}", red=True)
        session.exitstatus = 1


def stop_at_check(n: int):
    """A stand-in for ``engine._stop_requests`` that reports a stop request at its ``n``-th check
    (the engine checks once after each step), as Ctrl-C during step ``n`` would."""
    from contextlib import contextmanager

    class Flag:
        checks = 0

        def is_set(self):
            self.checks += 1
            return self.checks == n

    @contextmanager
    def stop_requests():
        yield Flag()

    return stop_requests
