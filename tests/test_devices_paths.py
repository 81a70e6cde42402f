"""Every other path that runs a model makes nothing off the model's device (see tests/test_devices.py).

The sentinel of tests/test_devices.py on the paths it does not run: the model (or text encoder)
is loaded on the CPU as usual, a ``DeviceRecorder`` hooks every submodule, and from then on torch's
default device is ``meta``, so a tensor lmlab makes without naming the model's device lands on meta
and reaches a forward there (or fails outright, copying out of meta). Covered here: the key-free
watermark classifier; ``watermark generate`` under every scheme and seeding scheme and a user's own
green lists (a self-salted run must also write the texts of a run without the meta default: a CPU
table indexed with meta ids reads garbage without an error); the CLIP text tower (encoding,
HotFlip, the inversion search, its cached vocabulary); ``prompt`` (zero-shot, few-shot on a
shared-prefix cache, zero-shot-cot's two stages; plain and chat); chat (generation in the template,
``evaluate --task chat``, classification in the template, ``finetune --task chat``); completion and
summarization evaluation of a causal LM; lm-evaluation-harness on a base model and a prefix.

Most cases run a whole command (``lmlab.cli.main``) with its loader wrapped (``sentinel_after``):
``from_pretrained`` refuses a meta default, so the meta default begins once the model is loaded.
"""

import json
from contextlib import ExitStack, contextmanager

import pytest
import torch
from test_devices import DeviceRecorder, record_on_meta
from test_invert_clip import bpe_clip  # noqa: F401  (a fixture)

from lmlab.cli import main


@contextmanager
def sentinel_after(monkeypatch, module, name, model_of=lambda loaded: loaded[0]):
    """While the block runs, ``module.name`` (a loader) loads as usual, hooks a ``DeviceRecorder`` on
    what it loaded (``model_of`` picks the model) and makes torch's default device meta from then
    on, until the block ends. Yields the recorders (one per load)."""
    recorders, stack = [], ExitStack()
    real = getattr(module, name)

    def loading(*args, **kwargs):
        loaded = real(*args, **kwargs)
        recorders.append(DeviceRecorder(model_of(loaded)))
        stack.enter_context(torch.device("meta"))
        return loaded

    monkeypatch.setattr(module, name, loading)
    with stack:
        yield recorders
    monkeypatch.setattr(module, name, real)
    for r in recorders:
        r.close()


@pytest.fixture(autouse=True)
def third_party_tensors_on_the_cpu(monkeypatch):
    """Tensors other libraries build on the CPU and move themselves (or hand to lmlab to move) stay
    there, as on a real machine: a tokenizer's ``return_tensors="pt"`` batch (lmlab sends it to the
    model's device) and transformers' stop-string table (moved to the ids' device at every call; it
    is cached for the process, so one built on meta here would break every later test)."""
    from transformers.generation.stopping_criteria import StopStringCriteria
    from transformers.tokenization_utils_base import BatchEncoding

    for owner, name in ((BatchEncoding, "convert_to_tensors"), (StopStringCriteria, "__init__")):
        def on_the_cpu(*args, _real=getattr(owner, name), **kwargs):
            with torch.device("cpu"):
                return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, on_the_cpu)


def clean(recorders, loads: int = 1) -> bool:
    return len(recorders) == loads and all(r.seen and r.strays() == [] for r in recorders)


# --- watermarks ------------------------------------------------------------------------------------

TEXTS = ["The weather today is mild and clear, with a light wind.", "Once upon a time a fox lived in a wood.",
         "A list of fruit: apples, pears, plums.", "Birds sing at dawn.", "A dog on a mat.",
         "Many words, all with a missing fifth symbol.", "Rain, and then more rain.", "Sun."]


def test_key_free_classifier_scores_on_the_models_device(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """``watermark classify --key-free``: one batched forward per 8 texts of different lengths
    (padding, its attention mask), under known counts."""
    import lmlab.models

    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))
    with sentinel_after(monkeypatch, lmlab.models, "load_model") as recorders:
        code = main(["watermark", "classify", "--key-free", "--input", str(tmp_path / "texts.json"), "--output",
                     str(tmp_path / "guesses.npy"), "--model", tiny_model_dir, "--balanced", "2", "--json",
                     "--no-progress", "--device", "cpu"])
    assert code == 0 and clean(recorders), capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["counts"]["none"] == 2


GREEN_LIST = "def green(previous, vocab_size):\n    return [(previous * 7 + i) % vocab_size for i in range(vocab_size // 4)]\n"


@pytest.mark.parametrize("schemes,extra", [
    ("none,no-e,hard,soft", ["--samples", "2", "--temperature", "0.8", "--top-k", "50"]),  # simple_1 (LeftHash)
    ("hard", ["--seeding-scheme", "selfhash", "--temperature", "0"]),  # self-salted: lists per candidate token
    ("soft", ["--seeding-scheme", "hf-selfhash", "--context-width", "2"]),
    ("hard", ["--green-list", "GREEN"]),  # a user's own lists
], ids=["simple_1", "selfhash", "hf-selfhash", "green-list"])
def test_watermark_generate_samples_on_the_models_device(schemes, extra, tiny_model_dir, tmp_path, monkeypatch,
                                                         capsys):
    """``watermark generate --schemes``: ``generate.sample_tokens`` with each scheme's processor
    (whose masks follow the scores' device; the lists stay on the CPU), sampled or greedy."""
    import lmlab.cli.watermark as command

    if "GREEN" in extra:
        (tmp_path / "lists.py").write_text(GREEN_LIST)
        extra = [str(tmp_path / "lists.py") + ":green" if e == "GREEN" else e for e in extra]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The history of the city begins\nIn the morning we walked to the market and\n")
    argv = ["watermark", "generate", "--schemes", schemes, "--prompts", str(prompts), "--model", tiny_model_dir,
            "--max-new-tokens", "3", "--no-progress", "--json", "--device", "cpu", *extra]
    with sentinel_after(monkeypatch, command, "load_model_or_run") as recorders:
        code = main([*argv, "--output", str(tmp_path / "out.jsonl")])
    assert code == 0 and clean(recorders), capsys.readouterr().err
    samples = 2 if "--samples" in extra else 1
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 2 * samples * len(schemes.split(","))
    if "selfhash" in schemes + " ".join(extra):
        # a CPU hash table indexed with meta ids reads garbage without an error: the lists (and so the
        # texts) must be those of a run without the meta default
        assert main([*argv, "--output", str(tmp_path / "reference.jsonl")]) == 0
        assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "reference.jsonl").read_text()
        capsys.readouterr()


# --- CLIP text towers and the inversion search on them ---------------------------------------------


def test_clip_encoding_and_inversion_stay_on_the_towers_device(request, tmp_path, monkeypatch):
    """``embed`` / ``invert --encoder clip:``: encoding batches, HotFlip's gradient through the
    tower (``clip_slot_gradient``), the beam search, and a second search from the cached vocabulary."""
    clip_dir = request.getfixturevalue("bpe_clip")  # test_invert_clip's tiny tower and BPE tokenizer
    from lmlab.invert import InvertConfig, invert, load_encoder

    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    encoder = load_encoder(f"clip:{clip_dir}")
    assert encoder.kind == "clip"
    recorder = DeviceRecorder(encoder.model)
    config = InvertConfig(max_words=3, beam=2, pool=8, proposals=16, flips=4, flip_beams=1, max_steps=1,
                          runners_up=1)
    with torch.device("meta"):
        targets = encoder.encode(["a red car", "nudity at night", "eiffel tower"])
        assert targets.device.type == "cpu" and encoder.encode([]).device.type == "cpu"
        for _ in range(2):  # the vocabulary's embeddings: encoded, then read back from the cache
            guesses = invert(targets[:1], encoder, config, progress=False)
    assert len(guesses) == 1 and guesses[0].steps == 1
    assert recorder.seen and recorder.strays() == []
    assert {n for n, _ in recorder.seen} >= {"<model>", "text_model.embeddings.token_embedding"}


# --- prompting on math word problems ---------------------------------------------------------------

GSM = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
       for a, b in ((3, 4), (5, 2), (7, 1), (2, 2), (6, 3), (4, 4))]


@pytest.fixture
def gsm_dir(tmp_path):
    folder = tmp_path / "gsm"
    folder.mkdir()
    for split, rows in (("train", GSM[2:]), ("test", GSM[:2])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_prompting_strategies_generate_on_the_models_device(tiny_model_dir, gsm_dir, monkeypatch, capsys):
    """``prompt``: zero-shot, few-shot (exemplars shared by every problem: the shared-prefix KV
    cache) and zero-shot-cot's two stages, with stop strings, plain and in the chat template
    (instruction and cot run as zero-shot and few-shot do)."""
    import lmlab.cli.prompt as command

    for chat, strategies in (("off", "few-shot,zero-shot-cot"), ("on", "zero-shot,few-shot")):
        with sentinel_after(monkeypatch, command, "load_model_or_run") as recorders:
            code = main(["prompt", "--model", tiny_model_dir, "--dataset", gsm_dir, "--shots", "2", "--max-new-tokens",
                         "3", "--strategies", strategies, "--chat-template", chat, "--json", "--no-progress",
                         "--device", "cpu"])
        assert code == 0 and clean(recorders), capsys.readouterr().err
        summary = json.loads(capsys.readouterr().out)
        assert summary["chat"] is (chat == "on") and [r["n"] for r in summary["results"]] == [2, 2]


# --- chat ------------------------------------------------------------------------------------------

CHATS = [{"instruction": f"Repeat the number {i}.", "output": f"{i}"} for i in range(8)] + \
        [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                            {"from": "human", "value": "Count to three."}, {"from": "gpt", "value": "1, 2, 3"}]}] * 4


CHAT_RUNS = {
    "generate": ["generate", "--prompts", "PROMPTS", "--chat-template", "on", "--temperature", "0.7", "--samples", "2",
                 "--max-new-tokens", "3", "--output", "OUT"],
    "loss": ["evaluate", "--task", "chat", "--dataset", "CHATS", "--val-fraction", "0.5", "--batch-size", "2"],
    "classify": ["evaluate", "--dataset", "TOY", "--chat-template", "on", "--limit", "4", "--batch-size", "2"],
    "classify-scoring": ["evaluate", "--dataset", "TOY", "--chat-template", "on", "--limit", "4", "--batch-size", "2",
                         "--scoring"],
}


@pytest.mark.parametrize("run", list(CHAT_RUNS))
def test_chat_generation_and_evaluation_stay_on_the_models_device(run, tiny_model_dir, toy_dataset, tmp_path,
                                                                  monkeypatch, capsys):
    """``generate --chat-template on`` (user turns), ``evaluate --task chat`` (the assistant turns'
    loss, loss masks), classification in the chat template, generated and scored."""
    import lmlab.cli.evaluate as evaluate_command
    import lmlab.cli.generate as generate_command

    (tmp_path / "prompts.txt").write_text("Repeat the number 3.\nCount to three, please.\n")
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    paths = {"PROMPTS": str(tmp_path / "prompts.txt"), "OUT": str(tmp_path / "out.jsonl"),
             "CHATS": str(tmp_path / "chat.jsonl"), "TOY": toy_dataset}
    argv = [paths.get(a, a) for a in CHAT_RUNS[run]]
    command = generate_command if argv[0] == "generate" else evaluate_command
    with sentinel_after(monkeypatch, command, "load_model_or_run") as recorders:
        code = main([*argv, "--model", tiny_model_dir, "--json", "--no-progress", "--device", "cpu"])
    assert code == 0 and clean(recorders), capsys.readouterr().err


def test_chat_finetuning_stays_on_the_models_device(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """``finetune --task chat``: batches with loss masks (only assistant tokens count), training
    and validation."""
    from lmlab import train

    recorders = record_on_meta(monkeypatch, train, "fit", [])
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    code = main(["finetune", "--task", "chat", "--model", tiny_model_dir, "--dataset", str(data), "--rank", "4",
                 "--batch-size", "4", "--max-iters", "2", "--eval-interval", "1", "--val-fraction", "0.25",
                 "--out-dir", str(tmp_path / "run"), "--no-progress", "--json", "--device", "cpu"])
    assert code == 0 and clean(recorders), capsys.readouterr().err


# --- completion and summarization evaluation of a causal LM ---------------------------------------


@pytest.mark.parametrize("task", ["completion", "summarization"])
def test_completion_and_summarization_evaluation_stay_on_the_models_device(task, tiny_model_dir, tmp_path,
                                                                           monkeypatch, capsys):
    """``evaluate --task completion`` (perplexity of a corpus's held-out blocks) and ``evaluate
    --task summarization`` (greedy TL;DR summaries, then ROUGE) on a decoder-only model."""
    import lmlab.cli.evaluate as command

    if task == "completion":
        data = tmp_path / "corpus.txt"
        data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
        extra = ["--block-size", "32"]
    else:
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps({"post": f"Post {i}: the function opens a file and counts its words.",
                                            "summary": "Count the words."}) + "\n" for i in range(8)))
        extra = ["--max-new-tokens", "3"]
    with sentinel_after(monkeypatch, command, "load_model_or_run") as recorders:
        code = main(["evaluate", "--task", task, "--dataset", str(data), "--batch-size", "2", *extra, "--model",
                     tiny_model_dir, "--json", "--no-progress", "--device", "cpu"])
    assert code == 0 and clean(recorders), capsys.readouterr().err


# --- lm-evaluation-harness --------------------------------------------------------------------------


def test_harness_runs_on_the_models_device(tiny_model_dir, toy_dataset, tmp_path, monkeypatch, capsys):
    """``evaluate --harness rotten_tomatoes`` on a base model, and ``harness.run`` on a model with a
    prefix (its virtual tokens' attention masks are lmlab's)."""
    import lmlab.cli.evaluate as command
    from lmlab import harness
    from lmlab.models import build_model, load_tokenizer, preset_config
    from lmlab.peft import prefix

    with sentinel_after(monkeypatch, command, "load_model_or_run") as recorders:
        code = main(["evaluate", "--harness", "rotten_tomatoes", "--dataset", toy_dataset, "--limit", "4",
                     "--batch-size", "2", "--model", tiny_model_dir, "--json", "--no-progress", "--device", "cpu"])
    assert code == 0 and clean(recorders), capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["results"]["rotten_tomatoes"]["n"] == 4

    model = build_model(preset_config("tiny-llama"))
    prefix.apply(model, prefix.PrefixConfig(length=3))
    config = harness.HarnessConfig(tasks=("rotten_tomatoes",), dataset=toy_dataset, limit=4, batch_size=2,
                                   progress=False)
    tasks = harness.load_tasks(config)
    recorder = DeviceRecorder(model)
    with torch.device("meta"):
        result = harness.run(model, load_tokenizer(tiny_model_dir), tasks, config)
    assert result["results"]["rotten_tomatoes"]["n"] == 4
    assert recorder.seen and recorder.strays() == []
