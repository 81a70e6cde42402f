"""``peft.dropout``: masks drawn by geometric gaps have nn.Dropout's distribution."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny

from lmlab.peft.dropout import SparseDropout, dropped_positions, sparse_dropout


def drop_indicator(n: int, p: float, **kw) -> torch.Tensor:
    positions = dropped_positions(n, p, **kw)
    assert torch.all(positions[1:] >= positions[:-1]), "positions are sorted"
    assert torch.all(positions[positions < n].diff() > 0), "no position twice below n"
    dropped = torch.zeros(n + 1, dtype=torch.bool)
    dropped[positions] = True
    return dropped[:n]


@pytest.mark.parametrize("p,chunk", [(0.01, None), (0.05, None), (0.2, None), (0.05, 7), (0.25, 1)])
def test_drops_are_independent_bernoulli(p, chunk):
    """Drop rate per position and overall, and of neighbouring pairs, within 5 standard errors;
    a small ``chunk`` makes the loop that draws more gaps run many times."""
    torch.manual_seed(0)
    trials, n = 3000, 200
    d = torch.stack([drop_indicator(n, p, chunk=chunk) for _ in range(trials)]).double()
    se = math.sqrt(p * (1 - p) / (trials * n))
    assert abs(d.mean().item() - p) < 5 * se
    first, last = d[:, 0].mean().item(), d[:, -1].mean().item()  # the ends are not special
    se_one = math.sqrt(p * (1 - p) / trials)
    assert abs(first - p) < 5 * se_one and abs(last - p) < 5 * se_one
    pairs = (d[:, :-1] * d[:, 1:]).mean().item()
    assert abs(pairs - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (trials * (n - 1))) + 1e-4


def test_sparse_dropout_scales_kept_entries_and_its_gradient_is_the_mask():
    torch.manual_seed(1)
    x = torch.randn(4, 7, 33, requires_grad=True)
    y = sparse_dropout(x, 0.1)
    kept = y != 0
    assert 0 < kept.logical_not().sum() < x.numel()
    torch.testing.assert_close(y[kept], x[kept] / 0.9)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.to(x.dtype) / 0.9)


def test_sparse_dropout_drops_every_entry_alike():
    """The mask is read from entry 0 to n-1 of the drawn positions: the first and last entries
    drop at rate p like the rest."""
    torch.manual_seed(2)
    p, trials = 0.1, 4000
    dropped = torch.stack([sparse_dropout(torch.ones(50), p) == 0 for _ in range(trials)]).double()
    se = math.sqrt(p * (1 - p) / trials)
    for column in (0, 25, 49):
        assert abs(dropped[:, column].mean().item() - p) < 5 * se


def test_same_seed_same_mask():
    x = torch.ones(1000)
    torch.manual_seed(3)
    a = sparse_dropout(x, 0.05)
    torch.manual_seed(3)
    assert torch.equal(a, sparse_dropout(x, 0.05))


@pytest.mark.parametrize("case", ["eval", "p above the sparse range", "not on the CPU"])
def test_sparse_dropout_falls_back_to_torch(case):
    """Eval mode is the identity; a large p, or a tensor off the CPU, takes F.dropout as is."""
    torch.manual_seed(0)
    x = torch.ones(64, 64)
    if case == "eval":
        assert torch.equal(SparseDropout(0.05).eval()(x), x)
    elif case == "p above the sparse range":
        module = SparseDropout(0.5)
        torch.manual_seed(5)
        expected = F.dropout(x, 0.5, True)
        torch.manual_seed(5)
        assert torch.equal(module(x), expected)
    else:
        out = SparseDropout(0.05)(x.to("meta"))
        assert out.device.type == "meta" and out.shape == x.shape


def test_lora_layers_use_it_and_keep_nn_dropout_behaviour():
    from lmlab import peft
    from lmlab.peft.lora import LoraLayer
    model = tiny("tiny-llama")
    peft.apply(model, peft.make_config("lora", r=4, dropout=0.1))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(isinstance(m.lora_dropout, SparseDropout) for m in layers)
    assert all(isinstance(m.lora_dropout, torch.nn.Dropout) and m.lora_dropout.p == 0.1 for m in layers)
