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


@pytest.mark.parametrize("case", ["p above the sparse range", "in place", "few entries", "empty"])
def test_sparse_dropout_falls_back_to_torch(case):
    """A large p, an in-place module or a small input takes F.dropout as is (the same masks)."""
    p, inplace, shape = {"p above the sparse range": (0.5, False, (64, 64)), "in place": (0.05, True, (64, 64)),
                         "few entries": (0.05, False, (3, 5)), "empty": (0.05, False, (0, 64))}[case]
    module, x = SparseDropout(p, inplace=inplace), torch.ones(shape)
    torch.manual_seed(5)
    expected = F.dropout(x.clone(), p, True, inplace)
    torch.manual_seed(5)
    assert torch.equal(module(x.clone()), expected)


def test_sparse_dropout_in_eval_and_off_the_cpu():
    x = torch.ones(64, 64)
    assert torch.equal(SparseDropout(0.05).eval()(x), x)
    out = SparseDropout(0.05)(x.to("meta"))
    assert out.device.type == "meta" and out.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.021, 0.05, 0.15])
def test_kept_entries_carry_torch_dropouts_scale_to_the_bit(dtype, p):
    torch.manual_seed(0)
    x = torch.ones(8192, dtype=dtype)
    ours, theirs = sparse_dropout(x, p), F.dropout(x, p, True)
    assert ours.dtype == dtype
    assert torch.equal(ours[ours != 0].unique(), theirs[theirs != 0].unique())


def test_edge_probabilities():
    """A p so small that one gap overflows int64 unclamped still works; p outside (0, 1) is refused."""
    assert dropped_positions(1000, 1e-20).le(1000).all()
    assert torch.equal(sparse_dropout(torch.ones(5000), 1e-20), torch.ones(5000))
    assert dropped_positions(0, 0.05).numel() == 0
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="dropout probability"):
            dropped_positions(10, bad)


def test_lora_forward_with_dropout_is_the_formula():
    """In training, h = W0 x + s B A dropout(x), with the mask the layer's dropout draws."""
    from lmlab import peft
    from lmlab.peft.lora import LoraLayer

    model = tiny("tiny-llama")
    peft.apply(model, peft.make_config("lora", r=4, alpha=8, dropout=0.1))
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    torch.nn.init.normal_(layer.lora_B.weight)
    layer.train()
    x = torch.randn(4, 40, layer.lora_A.in_features)
    torch.manual_seed(7)
    dropped = layer.lora_dropout(x)
    assert (dropped == 0).any()
    torch.manual_seed(7)
    expected = layer.base_layer(x) + layer.scaling * dropped @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_lora_layers_use_it_and_keep_nn_dropout_behaviour():
    from lmlab import peft
    from lmlab.peft.lora import LoraLayer
    model = tiny("tiny-llama")
    peft.apply(model, peft.make_config("lora", r=4, dropout=0.1))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(isinstance(m.lora_dropout, SparseDropout) for m in layers)
    assert all(isinstance(m.lora_dropout, torch.nn.Dropout) and m.lora_dropout.p == 0.1 for m in layers)
