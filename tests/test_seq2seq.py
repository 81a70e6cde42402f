"""Encoder-decoder fine-tuning (T5, Raffel et al. 2020) on a tiny random T5: the batch (right
padding, -100 past each label), the loss against transformers' own, LoRA training that memorises a
pair, resume equal to an uninterrupted run, ``evaluate RUN`` scoring ROUGE of the summaries peft's
loader of the saved adapter writes, classification (label words as the decoder's targets), every
tensor on the model's device, and one line for what an encoder-decoder model is not run for.

No T5 sentencepiece tokenizer is available offline, so the tiny T5 reads the SmolLM2 tokenizer
(GPT-2-style byte-level BPE, 49,152 ids) with a config of the same vocabulary; its EOS ``<|im_end|>``
is also the pad and the decoder's start id, as T5's ``</s>`` / ``<pad>`` are."""

import json

import pytest
import torch
from test_devices import DeviceRecorder, record_on_meta

from lmlab import engine, seq2seq
from lmlab.cli import main
from lmlab.data import Encoded
from lmlab.io import load_tensors
from lmlab.sft import SftData, summarization_items

POST = "The function opens a file, reads every line and counts the words in it, then returns the total."
SUMMARY = "Count the words of a file."
TEMPLATE = "summarize: {post}"


def t5_config(tokenizer, **kw):
    from transformers import T5Config

    eos = tokenizer.eos_token_id
    return T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                    num_heads=4, dropout_rate=0.0, decoder_start_token_id=eos, pad_token_id=eos, eos_token_id=eos,
                    **kw)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, tokenizer):
    """A tiny random T5 (d_model 32, 2 + 2 layers) as a local model folder, with the SmolLM2 tokenizer."""
    from transformers import T5ForConditionalGeneration

    path = tmp_path_factory.mktemp("tiny-t5")
    torch.manual_seed(0)
    T5ForConditionalGeneration(t5_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def pairs(tmp_path):
    """One pair, twelve times (so LoRA can memorise it), as a single .jsonl: the tail validates."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"post": POST, "summary": SUMMARY}) + "\n" for _ in range(12)))
    return path


def finetune(model_dir, data, out, *extra):
    return main(["finetune", "--task", "summarization", "--model", model_dir, "--dataset", str(data),
                 "--template", TEMPLATE, "--method", "lora", "--target", "q,v", "--rank", "4", "--alpha", "16",
                 "--batch-size", "4", "--lr", "2e-2", "--out-dir", str(out), "--no-progress", "--json", *extra])


# --- the batch and the loss -----------------------------------------------------------------------


def test_collate_right_pads_the_encoder_and_masks_labels_with_minus_100():
    items = [Encoded([5, 6, 7, 8], [9], 0), Encoded([5, 6], [10, 11, 12], 0)]
    ids, mask, labels = seq2seq.collate(items, pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7, 8], [5, 6, 0, 0]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert labels.tolist() == [[9, -100, -100], [10, 11, 12]]
    masked = Encoded([5], [9, 10], 0, loss_mask=(0, 1))
    assert seq2seq.collate([masked], 0, device="cpu")[2].tolist() == [[-100, 10]]


def test_shift_right_is_t5s(tokenizer):
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration(t5_config(tokenizer))
    labels = torch.tensor([[9, -100, -100], [10, 11, 12]])
    start, pad = seq2seq.decoder_ids(model)
    assert torch.equal(seq2seq.shift_right(labels, start, pad), model.prepare_decoder_input_ids_from_labels(labels=labels))


def test_loss_equals_transformers_and_a_sum_by_hand(tokenizer):
    """The label-token mean cross-entropy equals ``model(input_ids, attention_mask, labels=...).loss``,
    and a sum over each pair alone (no padding anywhere) of -log p(label_t | encoder, labels_<t)."""
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(t5_config(tokenizer, initializer_factor=5.0)).eval()
    items = [Encoded([5, 6, 7, 8, 9], [20, 21], 0), Encoded([5, 6], [22, 23, 24, 25], 0)]
    ids, mask, labels = seq2seq.collate(items, pad_id=tokenizer.pad_token_id, device="cpu")
    start, pad = seq2seq.decoder_ids(model)
    with torch.no_grad():
        loss, n = seq2seq.seq2seq_loss(model, ids, mask, labels, start, pad)
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        total = 0.0
        for it in items:
            decoder = torch.tensor([[start, *it.completion_ids[:-1]]])
            logp = model(input_ids=torch.tensor([it.prompt_ids]), decoder_input_ids=decoder).logits[0].log_softmax(-1)
            total -= sum(logp[t, y].item() for t, y in enumerate(it.completion_ids))
    assert n == 6 and loss.item() > 1
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=0)
    assert loss.item() == pytest.approx(total / 6, rel=1e-5)


def test_summarization_items_for_an_encoder_decoder(tokenizer):
    """The encoder reads the template around the post, the post cut at its end (never the template's
    tail nor the summary); the labels are the summary (no leading space) and EOS."""
    data = SftData(source="-", max_length=40, template="summarize: {post} Summary:")
    short, long = {"post": POST, "summary": SUMMARY}, {"post": "word " * 200, "summary": SUMMARY}
    items = summarization_items(tokenizer, [short, long], data, seq2seq=True)
    tail = tokenizer(" Summary:", add_special_tokens=False)["input_ids"]
    summary = tokenizer(SUMMARY, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert items[0].prompt_ids == tokenizer("summarize: " + POST)["input_ids"] + tail
    assert items[0].completion_ids == items[1].completion_ids == summary
    assert len(items[1]) == 40 and items[1].prompt_ids[-len(tail):] == tail
    assert items[1].prompt_ids[:3] == tokenizer("summarize: word")["input_ids"][:3]


def test_a_tokenizer_that_appends_eos_keeps_it_after_the_tail():
    """T5's tokenizer appends ``</s>`` to every text: it stays last, after the template's tail, when
    the post is cut (a word-level stand-in with T5's post-processor; no sentencepiece model offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "summarize:", "tl;dr", "a", "b", "c", "word"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5_like = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    data = SftData(source="-", max_length=12, template="summarize: {post} tl;dr")
    item = summarization_items(t5_like, [{"post": "word " * 20, "summary": "a b c"}], data, seq2seq=True)[0]
    assert item.completion_ids == [5, 6, 7, 1]  # a b c </s>
    assert item.prompt_ids == [3] + [8] * 5 + [4, 1] and len(item) == 12  # summarize: word x 5 tl;dr </s>


def test_a_bart_like_tokenizer_gives_the_decoder_bos_summary_eos():
    """BART's tokenizer wraps every text in <s> ... </s>, and transformers' recipe (text_target) trains
    the decoder on exactly that: bart-large's generation config forces <s> as the first new token, so
    labels without it would train on a sequence generation never produces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "<pad>", "</s>", "<unk>", "summarize:", "a", "b", "c", "word"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    bart_like = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    data = SftData(source="-", max_length=12, template="summarize: {post}")
    item = summarization_items(bart_like, [{"post": "word " * 20, "summary": "a b c"}], data, seq2seq=True)[0]
    assert item.completion_ids == [0, 5, 6, 7, 2]  # <s> a b c </s>
    assert item.prompt_ids == [0, 4] + [8] * 4 + [2] and len(item) == 12


# --- end to end ------------------------------------------------------------------------------------


def val_losses(run) -> list[float]:
    return [r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["val_loss"] is not None]


def test_lora_on_t5_memorises_a_pair_and_evaluate_scores_the_summaries_peft_writes(t5_dir, pairs, tmp_path,
                                                                                    capsys):
    """finetune lowers the validation loss step after step; its adapter (PEFT format, task type
    SEQ_2_SEQ_LM) loads in peft, and ``evaluate RUN`` (no flags: the run's template) reports the ROUGE
    of exactly the greedy summaries peft's model writes for the encoder prompts."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from lmlab.rouge import rouge

    run = tmp_path / "run"
    assert finetune(t5_dir, pairs, run, "--max-iters", "24", "--eval-interval", "8", "--target", "all-linear") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    losses = val_losses(run)
    assert summary["steps"] == 24 and len(losses) == 3 and losses[0] > losses[1] > losses[2], losses
    record = json.loads((run / "run.json").read_text())
    assert record["template"] == TEMPLATE and record["options"]["template"] == TEMPLATE
    config = json.loads((run / "best" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k", "o", "q", "v", "wi", "wo"] and config["peft_type"] == "LORA"
    assert config["task_type"] == "SEQ_2_SEQ_LM"  # peft then wraps the model as PeftModelForSeq2SeqLM

    output = tmp_path / "rouge.json"
    assert main(["evaluate", str(run), "--split", "validation", "--max-new-tokens", "12", "--output", str(output),
                 "--json", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads(output.read_text())
    predictions = [row["prediction"] for row in result["examples"]]

    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    base = AutoModelForSeq2SeqLM.from_pretrained(t5_dir)
    tuned = PeftModel.from_pretrained(base, str(run / "best")).eval()
    assert type(tuned).__name__ == "PeftModelForSeq2SeqLM"
    ids = tokenizer("summarize: " + POST, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = tuned.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             num_beams=1, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0], skip_special_tokens=True).strip().split("\n")[0].strip()
    assert predictions == [expected] * 2 and expected, predictions
    assert printed["mean"] == result["mean"] == rouge(predictions, [SUMMARY] * 2)["mean"]
    assert result["mean"]["rouge1"]["f"] > 0.5, expected  # memorised (most of) the one summary


def test_resume_after_stop_equals_the_uninterrupted_run(t5_dir, pairs, tmp_path, monkeypatch):
    args = ("--max-iters", "6", "--eval-interval", "2", "--lora-dropout", "0.1")
    assert finetune(t5_dir, pairs, tmp_path / "straight", *args) == 0
    calls = {"n": 0}
    real = seq2seq.seq2seq_loss

    def dies_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4 + 2 * 1 + 1:  # 4 training steps + 1 validation batch at steps 2 and 4, then step 5
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(seq2seq, "seq2seq_loss", dies_at_step_5)
    assert finetune(t5_dir, pairs, tmp_path / "killed", *args) == 130
    monkeypatch.setattr(seq2seq, "seq2seq_loss", real)
    assert json.loads((tmp_path / "killed/last/trainer_state.json").read_text())["step"] == 4
    assert finetune(t5_dir, pairs, tmp_path / "killed", *args, "--resume") == 0
    a = load_tensors(tmp_path / "straight/last/trainable.safetensors")
    b = load_tensors(tmp_path / "killed/last/trainable.safetensors")
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    assert val_losses(tmp_path / "straight") == val_losses(tmp_path / "killed")


@pytest.mark.parametrize("argv,message", [
    (["--task", "completion"], "encoder-decoder model: lmlab runs it for --task summarization or classification"),
    (["--task", "chat"], "encoder-decoder model: lmlab runs it for --task summarization or classification"),
    (["--task", "summarization", "--method", "prefix"], "--method prefix is for decoder-only models"),
])
def test_what_an_encoder_decoder_is_not_run_for_is_one_line(t5_dir, pairs, tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["finetune", "--model", t5_dir, "--dataset", str(pairs), "--out-dir", str(out), "--no-progress",
                 *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()


# --- fp16: T5's activations overflow it ----------------------------------------------------------


@pytest.mark.parametrize("model_type, dtype, expected", [
    ("t5", torch.float16, torch.float32),  # fp16 (auto on a GPU without bf16, or asked for): fp32, warned
    ("mt5", torch.float16, torch.float32),
    ("t5", torch.bfloat16, torch.bfloat16),  # bf16 has fp32's range
    ("t5", torch.float32, torch.float32),
    ("bart", torch.float16, torch.float16),
    ("llama", torch.float16, torch.float16),
])
def test_fp16_is_not_used_for_models_that_overflow_it(model_type, dtype, expected, capsys):
    from types import SimpleNamespace

    from lmlab.devices import model_dtype

    assert model_dtype(dtype, SimpleNamespace(model_type=model_type)) == expected
    assert ("overflow in fp16" in capsys.readouterr().err) == (expected != dtype)
    assert model_dtype(dtype, SimpleNamespace(model_type=model_type), quiet=True) == expected
    assert capsys.readouterr().err == ""


def test_t5_runs_in_fp32_wherever_fp16_would_be_used(t5_dir, pairs, tmp_path, monkeypatch, capsys):
    """A GPU without native bf16 (a T4, a V100) makes ``--dtype auto`` fp16, stood in for here:
    finetune (its loader and the engine's autocast), evaluate RUN and generate run T5 in fp32
    instead, each saying so once; so does an explicit ``--dtype fp16``."""
    from lmlab import devices
    from lmlab.train import load_checkpoint

    real = devices.select_dtype
    monkeypatch.setattr(devices, "select_dtype",
                        lambda name, device, **k: torch.float16 if name == "auto" else real(name, device, **k))
    seen = []
    real_accelerator = engine._accelerator
    monkeypatch.setattr(engine, "_accelerator", lambda cfg, device, dtype, out: (seen.append(dtype),
                                                                                 real_accelerator(cfg, device,
                                                                                                  dtype, out))[1])
    run = tmp_path / "run"
    assert finetune(t5_dir, pairs, run, "--max-iters", "1", "--eval-interval", "1", "--device", "cpu") == 0
    assert seen == [torch.float32]
    warning = "t5 models overflow in fp16 (NaN losses): running in fp32"
    assert capsys.readouterr().err.count(warning) == 1
    assert main(["evaluate", str(run), "--split", "validation", "--limit", "1", "--max-new-tokens", "2",
                 "--device", "cpu", "--json", "--no-progress"]) == 0
    assert capsys.readouterr().err.count(warning) == 1
    model, _, _ = load_checkpoint(run, device="cpu", dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("summarize: a b c\n")
    assert main(["generate", "--model", t5_dir, "--prompts", str(prompts), "--dtype", "fp16", "--device", "cpu",
                 "--max-new-tokens", "2", "--output", str(tmp_path / "out.jsonl"), "--no-progress"]) == 0
    assert warning in capsys.readouterr().err


# --- classification: the label word as the decoder's target --------------------------------------


def test_classification_scores_are_the_decoders_label_log_probabilities(tokenizer):
    """``--scoring`` sums log p(label token | prompt, earlier label tokens) from the decoder, the
    prompt in the encoder (two-token label words included); generation reads the label from what
    transformers' greedy ``generate`` writes for the prompt."""
    from transformers import T5ForConditionalGeneration

    from lmlab.data import Example, TaskFormat
    from lmlab.evaluate import evaluate_generation, label_logprobs

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(t5_config(tokenizer, initializer_factor=5.0)).eval()
    fmt = TaskFormat(label_words=("very negative", "positive"))
    examples = [Example("a fine, moving film", 1), Example("dull", 0), Example("i loved every minute of it", 1)]
    scores = label_logprobs(model, tokenizer, fmt, examples, batch_size=2)
    texts = []
    with torch.no_grad():
        for i, example in enumerate(examples):
            ids = torch.tensor([tokenizer(fmt.prompt(example.text))["input_ids"]])
            for j in range(2):
                label = tokenizer(fmt.completion(j), add_special_tokens=False)["input_ids"]
                loss = model(input_ids=ids, labels=torch.tensor([label])).loss
                assert scores[i, j].item() == pytest.approx(-loss.item() * len(label), rel=1e-4), (i, j)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                 do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id)
            texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    assert evaluate_generation(model, tokenizer, fmt, examples, batch_size=2, progress=False).generations == texts


def test_classification_on_t5_end_to_end(t5_dir, toy_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["finetune", "--model", t5_dir, "--dataset", toy_dataset, "--target", "q,v", "--rank", "4",
                 "--max-iters", "2", "--eval-interval", "2", "--batch-size", "4", "--eval-limit", "4",
                 "--out-dir", str(run), "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
    for mode in ([], ["--scoring"]):
        assert main(["evaluate", str(run), "--limit", "4", "--json", "--no-progress", *mode]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["n"] == 4 and result["unparseable"] <= 4 and sum(map(sum, result["confusion"])) == 4


# --- devices --------------------------------------------------------------------------------------


def test_a_training_step_stays_on_the_models_device(tokenizer, monkeypatch):
    """The model on ``meta``: a batch or decoder input made on the CPU would show up beside it."""
    from transformers import T5ForConditionalGeneration, masking_utils

    from lmlab import peft

    # the encoder's mask shortcut asks whether any position is padded, a value meta has none of
    monkeypatch.setattr(masking_utils, "_ignore_bidirectional_mask_sdpa", lambda *a, **k: False)
    config = t5_config(tokenizer)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    peft.apply(model, peft.make_config("lora", r=4, alpha=8.0, target_modules=("q", "v")))
    model.train()
    items = [Encoded([5, 6, 7, 8], [9], 0), Encoded([5, 6], [10, 11], 0)]
    task = seq2seq.task(model, tokenizer, items, items, eval_batch_size=2)
    recorder = DeviceRecorder(model)
    loss, metrics, tokens = task.loss(model, task.collate([0, 1], torch.device("meta")))
    loss.backward()
    assert recorder.seen and recorder.strays() == []
    assert tokens.device.type == "meta" and metrics["loss"].device.type == "meta"


def test_finetune_and_generation_make_nothing_off_the_models_device(t5_dir, pairs, tmp_path, monkeypatch):
    """The model on the CPU, torch's default device ``meta``: a tensor made without the model's
    device lands on meta and shows up (training, validation, generating summaries, classifying by
    generation and by label scores)."""
    from lmlab import finetune, train
    from lmlab.data import Example, TaskFormat
    from lmlab.evaluate import evaluate_generation, evaluate_scoring
    from lmlab.finetune import FinetuneConfig
    from lmlab.rouge import generate_summaries

    recorders = record_on_meta(monkeypatch, train, "fit", [])
    finetune.run(FinetuneConfig(model=t5_dir, task="summarization", dataset=str(pairs), template=TEMPLATE,
                                target="q,v", rank=4, alpha=8.0, max_iters=2, eval_interval=1, batch_size=4,
                                out_dir=str(tmp_path / "run"), no_progress=True, json=True, device="cpu"))
    assert recorders[0].seen and recorders[0].strays() == []
    model, tokenizer, _ = train.load_checkpoint(tmp_path / "run")
    items = summarization_items(tokenizer, [{"post": POST, "summary": SUMMARY}] * 3,
                                SftData(source="-", template=TEMPLATE), seq2seq=True)
    examples = [Example("a fine film", 1), Example("dull", 0), Example("i loved it", 1)]
    recorder = DeviceRecorder(model)
    with torch.device("meta"):
        generate_summaries(model, tokenizer, items, max_new_tokens=4, batch_size=2)
        evaluate_generation(model, tokenizer, TaskFormat(), examples, batch_size=2, progress=False)
        evaluate_scoring(model, tokenizer, TaskFormat(label_words=("very negative", "positive")), examples,
                         batch_size=2, progress=False)
    assert recorder.seen and recorder.strays() == []


def test_bart_generates_the_same_in_a_batch_as_alone():
    """BART's encoder adds learned absolute positions: a left-padded prompt would read other positions
    than alone (and than training's right padding), so generation pads an encoder's prompts on the right."""
    from lmlab.generate import SamplingConfig, sample
    from lmlab.models import build_model, preset_config

    class Tok:  # ids in, ids out: enough of a tokenizer for sample()
        pad_token_id, eos_token_id = 1, 2

        def batch_decode(self, rows, skip_special_tokens=True):
            return [" ".join(map(str, r.tolist())) for r in rows]

    config = preset_config("tiny-bart")
    config.init_std = 0.5  # a random model whose greedy texts depend on its input
    model = build_model(config).eval()
    prompts = [[0, 11, 12, 13, 2], [0, *range(100, 140), 2]]
    config = SamplingConfig(max_new_tokens=6, temperature=0.0, batch_size=2)
    together = sample(model, Tok(), prompts, config, progress=False)
    alone = [sample(model, Tok(), [p], config, progress=False)[0] for p in prompts]
    assert together == alone and len({t[0] for t in alone}) == 2, (together, alone)
