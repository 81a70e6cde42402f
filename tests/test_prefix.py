"""Prefix tuning: generate with cache == without, batched left-padded == one by one, counts, fold,
save/load, bad configs, and parameter-count parity with peft."""

import pytest
import torch
from conftest import logits, tiny

from lmlab import LmlabError
from lmlab.calc.params import prefix_count
from lmlab.models import model_spec
from lmlab.peft import count_parameters, prefix

CONFIGS = [prefix.PrefixConfig(length=4, init_std=1.0), prefix.PrefixConfig(length=3, hidden=16, init_std=1.0)]
PROMPTS = [[11, 250, 3001, 17, 942, 6], [77, 1024, 5], [400, 12, 9, 31000]]


def prefixed(family, config, seed=0):
    model = tiny(family, seed)
    torch.manual_seed(seed)
    return prefix.apply(model, config).eval()


def greedy(model, ids, mask=None, **kw):
    return model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                          max_new_tokens=6, do_sample=False, pad_token_id=0, **kw)


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "mlp"])
def test_generate_with_cache_equals_without(family, config):
    model = prefixed(family, config)
    ids, mask = left_padded(PROMPTS)
    assert torch.equal(greedy(model, ids, mask), greedy(model, ids, mask, use_cache=False))


@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "mlp"])
def test_batched_left_padded_equals_one_by_one(family, config):
    model = prefixed(family, config)
    ids, mask = left_padded(PROMPTS)
    batched = greedy(model, ids, mask)
    full = logits(model, ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    for row, p in enumerate(PROMPTS):
        alone = greedy(model, torch.tensor([p]))
        assert batched[row, ids.shape[1]:].tolist() == alone[0, len(p):].tolist()
        single = logits(model, torch.tensor([p]))[0]
        torch.testing.assert_close(full[row, -len(p):], single, atol=1e-5, rtol=0)


def test_prefix_changes_output_and_gets_gradients(family, ids):
    base = logits(tiny(family).eval(), ids)
    model = prefixed(family, CONFIGS[0]).train()
    assert not torch.allclose(logits(model, ids), base, atol=1e-3)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, name


@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "mlp"])
def test_only_prefix_trains_and_count_is_closed_form(family, config):
    model = prefixed(family, config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".prefix." in n or n.startswith("prefix_encoder.") for n in trainable)
    spec = model_spec(model.config)
    assert count_parameters(model)[0] == prefix_count(spec, config.length, config.hidden)


def test_fold_keeps_outputs_and_leaves_plain_prefixes(family, ids):
    model = prefixed(family, CONFIGS[1])
    before = logits(model, ids)
    prefix.fold(model)
    assert not hasattr(model, "prefix_encoder")
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)
    spec = model_spec(model.config)
    assert count_parameters(model)[0] == prefix_count(spec, CONFIGS[1].length)


@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "mlp"])
def test_save_load_round_trip(family, config, ids, tmp_path):
    model = prefixed(family, config)
    prefix.save(model, tmp_path)
    restored = prefix.load(tiny(family), tmp_path).eval()
    torch.testing.assert_close(logits(restored, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_loading_into_another_model_is_an_error(tmp_path):
    prefix.save(prefixed("tiny-gpt2", CONFIGS[0]), tmp_path)
    with pytest.raises(LmlabError, match="another model"):
        prefix.load(tiny("tiny-llama"), tmp_path)


@pytest.mark.parametrize("kwargs,message", [({"length": 0}, "length"), ({"length": -3}, "length"),
                                            ({"hidden": 0}, "hidden"), ({"hidden": -8}, "hidden")])
def test_bad_config(kwargs, message):
    with pytest.raises(LmlabError, match=message):
        prefix.PrefixConfig(**kwargs)


@pytest.mark.parametrize("preset", ["gpt2", "smollm2-135m"])
@pytest.mark.parametrize("hidden", [None, 32])
def test_counts_equal_peft(preset, hidden):
    peft = pytest.importorskip("peft")
    from lmlab.models import build_model, preset_config

    theirs = peft.get_peft_model(build_model(preset_config(preset), device="meta"), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=10, prefix_projection=hidden is not None,
        encoder_hidden_size=hidden or 1))
    ours = prefix.apply(build_model(preset_config(preset), device="meta"), prefix.PrefixConfig(length=10, hidden=hidden))
    assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def sgd_step(model, ids, lr=1.0) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "mlp"])
def test_deep_copy_trains_on_its_own_prefixes(family, ids, config):
    """A copy (e.g. a frozen reference model) is a model of its own: an optimizer step on it
    moves its prefixes (and MLP) and its outputs, and leaves the original's parameters, outputs
    and gradients as they were; a step on the original then leaves the copy where it was. Each
    takes two steps: a prefix cached from the previous forward would fail the second backward."""
    import copy

    model = prefixed(family, config).train()
    before, before_logits = trainable(model), logits(model.eval(), ids)
    twin = copy.deepcopy(model).train()
    for _ in range(2):
        sgd_step(twin, ids)
    moved = trainable(twin)
    assert before.keys() == moved.keys() and all(not torch.equal(moved[n], before[n]) for n in before)
    assert all(torch.equal(p, before[n]) for n, p in trainable(model).items())
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(logits(model.eval(), ids), before_logits, atol=0, rtol=0)
    twin_logits = logits(twin.eval(), ids)
    assert not torch.allclose(twin_logits, before_logits, atol=1e-3)  # the copy runs on its own prefixes
    model.train()
    for _ in range(2):
        sgd_step(model, ids)
    assert all(not torch.equal(p, before[n]) for n, p in trainable(model).items())
    assert all(torch.equal(p, moved[n]) for n, p in trainable(twin).items())
    torch.testing.assert_close(logits(twin, ids), twin_logits, atol=0, rtol=0)


@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "mlp"])
def test_deep_copy_after_a_training_forward(family, ids, config):
    """A model copied right after a forward with gradients (a DPO reference taken mid-run): the
    cached MLP prefixes of that forward belong to its graph and are not copied; the copy gives the
    same outputs and trains on its own."""
    import copy

    model = prefixed(family, config).train()
    model(ids, labels=ids).loss.backward()
    twin = copy.deepcopy(model)
    torch.testing.assert_close(logits(twin.eval(), ids), logits(model.eval(), ids), atol=0, rtol=0)
    before = trainable(model)
    sgd_step(twin.train(), ids)
    assert all(torch.equal(p, before[n]) for n, p in trainable(model).items())
