"""Scaling laws fitted from runs (Chinchilla approach 3), the simple-law split and relative loss targets:
recovery of known constants, parity with torch's Huber / log-sum-exp / L-BFGS, and hand-computed numbers."""

import json
import math

import numpy as np
import pytest

from lmlab import LmlabError
from lmlab.calc import scaling, scaling_fit
from lmlab.cli import main

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022, Eq. 10


def synthetic_runs(noise: float = 0.0, seed: int = 0):
    """30 runs on a 6 x 5 grid of N in [1e7, 3e9] and D in [1e9, 1e11], loss from the known law, times
    exp(noise * standard normal)."""
    rng = np.random.default_rng(seed)
    n, d = (a.ravel() for a in np.meshgrid([1e7, 3e7, 1e8, 3e8, 1e9, 3e9], [1e9, 3e9, 1e10, 3e10, 1e11]))
    loss = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
    return list(n), list(d), list(loss * np.exp(noise * rng.standard_normal(len(n))))


def write_runs(path, rows, header="params,tokens,loss"):
    path.write_text(header + "\n" + "".join(",".join(f"{v:.8g}" for v in row) + "\n" for row in rows))
    return path


def test_recovers_the_law_from_exact_runs():
    """Full 4500-point grid, as the paper: exact losses give back the constants to float precision."""
    r = scaling_fit.fit(*synthetic_runs())
    for name, value in TRUE.items():
        assert getattr(r, name) == pytest.approx(value, rel=1e-6), name
    assert r.huber_loss < 1e-20 and r.n_runs == 30 and r.intervals == {}
    # a = β/(α+β) = 0.28/0.62 = 0.451613, b = 0.34/0.62 = 0.548387
    assert r.exponents == (pytest.approx(0.451613, rel=1e-5), pytest.approx(0.548387, rel=1e-5))


def test_recovers_the_law_from_noisy_runs_with_intervals():
    """0.5% multiplicative noise: the exponents stay close, and the bootstrap intervals hold the truth."""
    r = scaling_fit.fit(*synthetic_runs(noise=0.005, seed=1), bootstrap=100, seed=0, starts=300)
    assert r.alpha == pytest.approx(0.34, abs=0.03) and r.beta == pytest.approx(0.28, abs=0.03)
    assert r.E == pytest.approx(1.69, abs=0.15)
    a, _ = r.exponents
    assert a == pytest.approx(0.4516, abs=0.04)
    for name in ("E", "alpha", "beta", "exponent_params"):
        lo, hi = r.intervals[name]
        truth = 0.28 / 0.62 if name == "exponent_params" else TRUE[name]
        assert lo <= truth <= hi, (name, lo, hi)
    for name in scaling_fit.NAMES:  # the point estimate lies inside its own interval
        lo, hi = r.intervals[name]
        assert lo <= getattr(r, name) <= hi
    # same seed, same intervals
    again = scaling_fit.fit(*synthetic_runs(noise=0.005, seed=1), bootstrap=100, seed=0, starts=300)
    assert again.intervals == r.intervals


def test_objective_matches_torch_huber_of_logsumexp():
    """Parity: our loss and hand-derived gradient against torch's huber_loss(logsumexp(...)) and autograd."""
    import torch

    n, d, loss = synthetic_runs(noise=0.01, seed=2)
    u, v, y = np.log(n) - 20.0, np.log(d) - 23.0, np.log(loss)
    x = np.random.default_rng(0).normal(size=(4, 5)) * [3.0, 0.3, 3.0, 0.3, 0.5] + [7.0, 0.3, 7.0, 0.3, 0.5]
    f, g = scaling_fit.objective(x, u, v, y, np.ones((1, len(u))))
    for row in range(len(x)):
        p = torch.tensor(x[row], dtype=torch.float64, requires_grad=True)
        uu, vv, yy = (torch.tensor(a, dtype=torch.float64) for a in (u, v, y))
        lse = torch.logsumexp(torch.stack([p[0] - p[1] * uu, p[2] - p[3] * vv, p[4].expand_as(uu)]), dim=0)
        ref = torch.nn.functional.huber_loss(lse, yy, delta=1e-3, reduction="sum")
        ref.backward()
        assert f[row] == pytest.approx(ref.item(), rel=1e-10)
        assert g[row] == pytest.approx(p.grad.numpy(), rel=1e-8, abs=1e-14)


def test_torch_lbfgs_finds_nothing_lower():
    """From our best fit of noisy runs, torch.optim.LBFGS (strong Wolfe) cannot lower the objective."""
    import torch

    n, d, loss = synthetic_runs(noise=0.005, seed=3)
    r = scaling_fit.fit(n, d, loss, starts=300)
    lse_args = (torch.tensor(np.log(n)), torch.tensor(np.log(d)), torch.tensor(np.log(loss)))
    p = torch.tensor([math.log(r.A), r.alpha, math.log(r.B), r.beta, math.log(r.E)], dtype=torch.float64,
                     requires_grad=True)

    def closure():
        opt.zero_grad()
        ln, ld, ly = lse_args
        lse = torch.logsumexp(torch.stack([p[0] - p[1] * ln, p[2] - p[3] * ld, p[4].expand_as(ln)]), dim=0)
        value = torch.nn.functional.huber_loss(lse, ly, delta=1e-3, reduction="sum")
        value.backward()
        return value

    opt = torch.optim.LBFGS([p], max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-15,
                            tolerance_change=1e-18)
    start = closure().item()
    assert start == pytest.approx(r.huber_loss, rel=1e-9)
    opt.step(closure)
    assert closure().item() >= start * (1 - 1e-6)


def test_lbfgs_minimises_a_batch_of_rosenbrocks():
    """The batched optimiser on its own: f = (1 − x)² + 100 (y − x²)², minimum at (1, 1), from three starts."""
    def rosen(p, rows):
        x, y = p[:, 0], p[:, 1]
        f = (1 - x) ** 2 + 100 * (y - x * x) ** 2
        return f, np.stack([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)], axis=1)

    x, f = scaling_fit.lbfgs(rosen, np.array([[-1.2, 1.0], [2.0, 2.0], [0.0, -1.0]]), max_iter=2000, ftol=0)
    assert x == pytest.approx(np.ones((3, 2)), abs=1e-6) and f.max() < 1e-12


@pytest.mark.parametrize("text,message", [
    ("params,tokens\n1,2\n", "missing column(s) loss"),
    ("params,tokens,loss\n1e8,1e9,abc\n", "loss is not a number"),
    ("params,tokens,loss\n1e8,0,3.0\n", "tokens must be a positive number"),
    ("params,tokens,loss\n1e8,1e9,-3\n", "loss must be a positive number"),
    ("params,tokens,loss\n" + "".join(f"{n},{n * 10},3\n" for n in (1e7, 1e8, 1e9, 1e10)), "at least 5 runs"),
    ("params,tokens,loss\n" + "".join(f"1e9,{d},3\n" for d in (1e9, 2e9, 3e9, 4e9, 5e9)), "two or more model"),
])
def test_bad_runs_are_one_line_errors(tmp_path, capsys, text, message):
    path = tmp_path / "runs.csv"
    path.write_text(text)
    assert main(["scaling", "fit", "--runs", str(path), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not any("Traceback" in line for line in err)


def test_cli_fit_json_and_plot(tmp_path, capsys):
    runs = write_runs(tmp_path / "runs.csv", zip(*synthetic_runs(noise=0.003, seed=4)))
    png = tmp_path / "fit.png"
    assert main(["scaling", "fit", "--runs", str(runs), "--bootstrap", "20", "--starts", "100", "--seed", "1",
                 "--plot", str(png), "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert {"E", "A", "B", "alpha", "beta", "exponent_params", "exponent_tokens", "huber_loss", "n_runs",
            "intervals", "bootstrap", "seed", "plot"} <= set(out)
    assert out["n_runs"] == 30 and out["bootstrap"] == 20 and set(out["intervals"]) >= {"E", "alpha", "beta"}
    assert out["exponent_params"] + out["exponent_tokens"] == pytest.approx(1.0)
    assert out["alpha"] == pytest.approx(0.34, abs=0.03) and "fitting 30 runs" in captured.err
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["scaling", "fit", "--runs", str(runs), "--bootstrap", "0", "--starts", "50"]) == 0
    text = capsys.readouterr().out
    assert "fitted to 30 runs" in text and "alpha" in text and "interval" not in text


def test_simple_split_hand_computed():
    # C = N D = 1e11 * 3e11 = 3e22; ln C = ln 3 + 22 ln 10 = 1.098612 + 50.656872 = 51.755484
    # N* = C^0.46 = exp(23.807523) = 2.185122e10; D* = C / N* = 3e22 / 2.185122e10 = 1.372921e12 = C^0.54
    # D kept: N = D^(0.46/0.54) = exp(26.427048 * 0.851852) = exp(22.511930) = 5.981457e9
    # N kept: D = N^(0.54/0.46) = exp(25.328436 * 1.173913) = exp(29.733381) = 8.185467e12
    s = scaling.simple_split(100e9, 300e9, 0.46, 0.54, flops_per_param_token=1)
    assert s["compute"] == pytest.approx(3e22)
    assert s["optimal_params"] == pytest.approx(2.185122e10, rel=1e-5)
    assert s["optimal_tokens"] == pytest.approx(1.372921e12, rel=1e-5)
    assert s["optimal"] is False and s["params_ratio"] == pytest.approx(1e11 / 2.185122e10, rel=1e-5)
    assert s["params_for_tokens"] == pytest.approx(5.981457e9, rel=1e-5)
    assert s["tokens_for_params"] == pytest.approx(8.185467e12, rel=1e-5)
    # each answer makes its pair optimal, and x + y = 1 keeps D* = C^y
    assert scaling.simple_split(s["params_for_tokens"], 300e9, 0.46, 0.54, 1)["optimal"] is True
    assert scaling.simple_split(100e9, s["tokens_for_params"], 0.46, 0.54, 1)["optimal"] is True
    # 6ND: C = 1.8e23, N* = C^0.46 = 2.185122e10 * exp(0.46 * 1.791759) = 2.185122e10 * 2.280078 = 4.982248e10,
    # D* = C / (6 N*) = 3e22 / 4.982248e10 = 6.021378e11; D kept: N = (6 D)^(0.46/0.54) = (1.8e12)^0.851852
    # = exp(28.218808 * 0.851852) = exp(24.038244) = 2.752174e10; N kept: D = N^(0.54/0.46) / 6 = 1.364245e12
    s6 = scaling.simple_split(100e9, 300e9, 0.46, 0.54)
    assert s6["compute"] == pytest.approx(1.8e23)
    assert s6["optimal_params"] == pytest.approx(4.982248e10, rel=1e-5)
    assert s6["optimal_tokens"] == pytest.approx(6.021378e11, rel=1e-5)
    assert s6["params_for_tokens"] == pytest.approx(2.752174e10, rel=1e-5)
    assert s6["tokens_for_params"] == pytest.approx(1.364245e12, rel=1e-5)
    assert scaling.simple_split(s6["params_for_tokens"], 300e9, 0.46, 0.54)["optimal"] is True
    with pytest.raises(LmlabError, match="add up to 1"):
        scaling.simple_split(1e9, 1e9, 0.5, 0.6)


def test_loss_change_hand_computed():
    # L(1e9, 1e9) = 1.69 + 0.3539596 + 1.2402942 = 3.2842538; -1%: target = 0.99 * 3.2842538 = 3.2514113
    # fresh tokens at N = 1e9: B/D^b = 3.2514113 - 1.69 - 0.3539596 = 1.2074517, D = (410.7/1.2074517)^(1/0.28)
    #   = 340.1378^3.571429 = exp(5.829351 * 3.571429) = exp(20.819111) = 1.100589e9
    # repeating the 1e9 unique tokens: D'/D = 1.100589 = 2 (1 - 2^-(x+1)) -> x = -log2(1 - 0.550294) - 1 = 0.152946
    # one pass over 1e9 tokens: A/N^a = 3.2514113 - 1.69 - 1.2402942 = 0.3211171, N = (406.4/0.3211171)^(1/0.34)
    #   = 1265.581^2.941176 = exp(7.143284 * 2.941176) = exp(21.009659) = 1.331629e9
    c = scaling.loss_change(1e9, 1e9, -0.01)
    assert c["loss"] == pytest.approx(3.2842538, rel=1e-6) and c["target_loss"] == pytest.approx(3.2514113, rel=1e-6)
    assert c["tokens_for_target"] == pytest.approx(1.100589e9, rel=1e-5)
    assert c["repeat"]["extra_epochs"] == pytest.approx(0.152946, rel=1e-4)
    assert c["repeat"]["extra_compute"] == pytest.approx(6e18 * 0.152946, rel=1e-4)
    assert c["params_for_target"] == pytest.approx(1.331629e9, rel=1e-5)
    # N scaled by 1.41 on the same 1e9 tokens: A/N^a = 0.3539596 / 1.41^0.34 = 0.3539596 / exp(0.34 * 0.3435897)
    #   = 0.3539596 / 1.123918 = 0.3149337; L = 1.69 + 0.3149337 + 1.2402942 = 3.2452279, -1.1883%: past the
    #   target on one pass, so no extra epochs
    s = scaling.loss_change(1e9, 1e9, -0.01, params_scale=1.41)
    assert s["params"] == pytest.approx(1.41e9) and s["loss_at_params"] == pytest.approx(3.2452279, rel=1e-6)
    assert s["loss_change_at_params"] == pytest.approx(-0.011883, rel=1e-3)
    assert s["repeat"]["extra_epochs"] == 0
    # -50% is below E + A/N^a = 2.044: every route is unreachable, and says why
    far = scaling.loss_change(1e9, 1e9, -0.5)
    assert far["tokens_for_target"] is None and far["params_for_target"] is None and far["repeat"] is None
    assert "unreachable" in far["repeat_unreachable"]


def test_cli_split_and_loss_change(capsys):
    assert main(["scaling", "--split-exponents", "0.46,0.54", "--params", "100e9", "--tokens", "300e9",
                 "--compute-formula", "ND", "--json"]) == 0
    split = json.loads(capsys.readouterr().out)["split"]
    assert split["optimal"] is False and split["params_for_tokens"] == pytest.approx(5.981457e9, rel=1e-5)
    assert split["compute_formula"] == "ND" and split["compute"] == pytest.approx(3e22)
    assert main(["scaling", "--split-exponents", "0.46,0.54", "--params", "100e9", "--tokens", "300e9"]) == 0
    assert "C = 6ND = 1.8e+23" in capsys.readouterr().out
    results = []
    for change in ("-1%", "-0.01"):  # "-1%" reads as a value, not an option
        assert main(["scaling", "--params", "1e9", "--tokens", "1e9", "--loss-change", change, "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out)["loss_change"])
    assert results[0] == results[1] and results[0]["change"] == pytest.approx(-0.01)
    assert main(["scaling", "--params", "1e9", "--tokens", "1e9", "--loss-change", "-1%", "--params-scale", "1.41"]) == 0
    assert "-1.19%" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["scaling", "fit"], "needs --runs"),
    (["scaling", "--runs", "x.csv", "--params", "1e9", "--tokens", "1e9"], "belongs to `lmlab scaling fit`"),
    (["scaling", "--split-exponents", "0.46", "--params", "1e9", "--tokens", "1e9"], "two exponents"),
    (["scaling", "--split-exponents", "0.5,0.6", "--params", "1e9", "--tokens", "1e9"], "add up to 1"),
    (["scaling", "--split-exponents", "0.46,0.54", "--compute", "1e20"], "need a run"),
    (["scaling", "--params", "1e9", "--tokens", "1e9", "--loss-change", "-100%"], "above -100%"),
    (["scaling", "--params", "1e9", "--tokens", "1e9", "--params-scale", "2"], "--params-scale needs --loss-change"),
    (["scaling", "--params", "1e9", "--tokens", "1e9", "--loss-change", "x"], "relative change"),
])
def test_cli_bad_input_is_one_line(capsys, argv, message):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and not any("Traceback" in line for line in err)
