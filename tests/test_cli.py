"""The command line: --json output, and bad input ending in one line with exit status 2."""

import json

import pytest

from lmlab.cli import main


def test_params_json(capsys):
    assert main(["params", "--model", "gpt2", "--method", "lora", "--rank", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["trainable"], out["total"]) == (294_912, 124_734_720)
    assert out["percent"] == pytest.approx(0.2364, abs=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["params", "--method", "lora", "--rank", "0"], "--rank/-r: expected a positive integer"),
    (["params", "--method", "bitfit"], "BitFit trains bias terms only"),
    (["params", "--model", "gpt2", "--target", "nope"], "matches no"),
    (["params", "--method", "prefix", "--prefix-length", "0"], "length"),
    (["params", "--method", "adapter", "--bottleneck", "-1"], "bottleneck"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # caught by the parser: "lmlab params: error: ...; see lmlab params --help"
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("lmlab") and "error:" in err and message in err
