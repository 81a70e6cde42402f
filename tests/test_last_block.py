"""``models.last_block_on_rows``: the last block's attention output projection and MLP run on the kept
positions only, and the losses, gradients and KV caches that read those positions do not change."""

import contextlib

import pytest
import torch
from conftest import randomize, tiny

from lmlab import dpo, peft, train
from lmlab.data import Encoded, left_pad_batch
from lmlab.kvcache import prefix_cache
from lmlab.models import last_block_on_rows, model_spec

DECODERS = ["tiny-gpt2", "tiny-llama", "tiny-phi", "tiny-phi3"]
METHODS = [("lora", {}), ("adapter", {}), ("prefix", {}), ("full", {})]
ITEMS = [Encoded([5, 6, 7, 8, 9, 10, 11], [12, 13], 0), Encoded([20, 21, 22], [23], 1),
         Encoded([30, 31, 32, 33, 34], [35, 36], 0)]


def untrimmed(model):
    return contextlib.nullcontext()


def last_block_parts(model):
    """The last block's attention output projection and MLP."""
    spec = model_spec(model.config)
    suffixes = [f".{spec.layers - 1}.{spec.attn_out}", f".{spec.layers - 1}.{spec.mlp_out.rsplit('.', 1)[0]}"]
    return [next(m for n, m in model.named_modules() if n.endswith(s)) for s in suffixes]


def last_mlp(model):
    return last_block_parts(model)[1]


def rows_seen(model, keep, part=1):
    """How many positions the last MLP (part 1; 0: the attention output projection) reads in a forward
    that keeps ``keep`` logits inside ``last_block_on_rows``."""
    seen = []
    ids = torch.arange(3, 12)[None]
    with last_block_on_rows(model):
        hook = last_block_parts(model)[part].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-2]))
        try:
            with torch.no_grad():
                model(input_ids=ids, logits_to_keep=keep)
        finally:
            hook.remove()
    return seen[0]


def trained(name, method):
    model = tiny(name)
    peft.apply(model, peft.make_config(method))
    randomize([p for p in model.parameters() if p.requires_grad] if method != "full" else [])
    return model.train()


def loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks (LoRA's) on both sides
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("method,kw", METHODS, ids=[m for m, _ in METHODS])
def test_label_loss_and_gradients_unchanged(name, method, kw, monkeypatch):
    model = trained(name, method)
    batch = left_pad_batch(ITEMS, 0, device="cpu")
    k = batch[3].shape[1] + 1
    assert rows_seen(model, k, part=0) == rows_seen(model, k) == k  # it did trim
    loss, grads = loss_and_grads(model, lambda: train.label_loss(model, *batch)[0])
    monkeypatch.setattr(train, "last_block_on_rows", untrimmed)
    ref_loss, ref_grads = loss_and_grads(model, lambda: train.label_loss(model, *batch)[0])
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-6, rtol=1e-4, msg=n)


def test_dpo_log_probs_unchanged(monkeypatch):
    model = trained("tiny-llama", "lora").eval()
    with torch.no_grad():
        got = dpo.completion_logps(model, ITEMS, 0)
        monkeypatch.setattr(dpo, "last_block_on_rows", untrimmed)
        want = dpo.completion_logps(model, ITEMS, 0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_prefix_cache_unchanged(name):
    import lmlab.kvcache as kvcache

    model = tiny(name).eval()
    prefix = [3, 4, 5, 6, 7, 8]
    with torch.no_grad():
        got = prefix_cache(model, prefix)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kvcache, "last_block_on_rows", untrimmed)
            want = prefix_cache(model, prefix)
    for a, b in zip(got.layers, want.layers):
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)


def test_hooks_removed_even_after_an_error():
    model = tiny("tiny-llama")
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with last_block_on_rows(model):
            assert hook_count(model) == before + 5  # the model's (reads logits_to_keep), two on each part
            raise RuntimeError("boom")
    assert hook_count(model) == before
    assert rows_seen(model, 20) == 9  # keep beyond the length: nothing cut
    assert rows_seen(model, 0) == 9  # logits_to_keep=0 keeps every position


def test_off_under_gradient_checkpointing():
    """The recomputation in backward runs outside the context, so the forward must not differ."""
    model = trained("tiny-llama", "lora")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert rows_seen(model, 2) == 9
    batch = left_pad_batch(ITEMS, 0, device="cpu")
    train.label_loss(model, *batch)[0].backward()  # no recomputation mismatch


def hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_encoder_decoder_untouched():
    model = tiny("tiny-t5")
    before = hook_count(model)
    with last_block_on_rows(model):
        assert hook_count(model) == before


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lmlab.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.mark.parametrize("path", ["sample", "evaluate_generation", "label_logprobs"])
def test_generation_and_scoring_run_the_last_mlp_on_one_position(path, tokenizer):
    """Every forward of a prompt (and of each new token) needs only its last position: the last MLP
    reads one row per sequence there (their outputs are held equal to untrimmed runs in
    test_generate.py and test_evaluate.py)."""
    from lmlab.data import Example, TaskFormat
    from lmlab.evaluate import evaluate_generation, label_logprobs
    from lmlab.generate import SamplingConfig, sample

    model = tiny("tiny-llama").eval()
    seen = []
    # registered before the context's hooks: sees the MLP's own output, before it is padded back
    hook = last_mlp(model).register_forward_hook(lambda m, a, out: seen.append(out.shape[-2]))
    examples = [Example("a fine film", 1), Example("dull and far too long for what it says", 0)]
    if path == "sample":
        sample(model, tokenizer, ["Once upon a time", "The capital of France is"],
               SamplingConfig(max_new_tokens=3, temperature=0), progress=False)
    elif path == "evaluate_generation":
        evaluate_generation(model, tokenizer, TaskFormat(), examples, max_new_tokens=3, progress=False)
    else:
        label_logprobs(model, tokenizer, TaskFormat(), examples, progress=False)
    hook.remove()
    assert seen and set(seen) == {1}


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_modules_with_active_dropout_stay_whole(name, monkeypatch):
    """All-linear LoRA with dropout puts masks inside the MLP (and GPT-2's MLP has its own): those
    modules run on every position, so the masks, the loss and the gradients are the ones an
    untrimmed run (or one with gradient checkpointing) draws."""
    model = tiny(name)
    peft.apply(model, peft.make_config("lora", target_modules="all-linear", dropout=0.1))
    randomize([p for p in model.parameters() if p.requires_grad])
    model.train()
    assert rows_seen(model, 2) == 9
    batch = left_pad_batch(ITEMS, 0, device="cpu")
    loss, grads = loss_and_grads(model, lambda: train.label_loss(model, *batch)[0])
    monkeypatch.setattr(train, "last_block_on_rows", untrimmed)
    ref_loss, ref_grads = loss_and_grads(model, lambda: train.label_loss(model, *batch)[0])
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    model.eval()
    assert rows_seen(model, 2) == 2  # eval: no dropout, trimmed again


def test_assisted_decoding_keeps_what_it_verifies(tokenizer, monkeypatch):
    """Prompt-lookup decoding (set in a model's generation config) verifies several candidate tokens
    in one forward (logits_to_keep = candidates + 1): the trim follows each forward's own
    logits_to_keep, so ``sample`` gives what it gives untrimmed."""
    import lmlab.generate as generate
    from lmlab.models import build_model, preset_config

    config = preset_config("tiny-llama")
    config.initializer_range = 0.3  # outputs that depend on the input, so candidates are verified
    model = build_model(config, seed=0).eval()
    model.generation_config.prompt_lookup_num_tokens = 4
    prompt, cfg = ["a b c a b c a b c a b c a b"], generate.SamplingConfig(max_new_tokens=12, temperature=0)
    got = generate.sample(model, tokenizer, prompt, cfg, progress=False, shared_prefix=False)
    monkeypatch.setattr(generate, "last_block_on_rows", untrimmed)
    assert got == generate.sample(model, tokenizer, prompt, cfg, progress=False, shared_prefix=False)
