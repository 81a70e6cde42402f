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
    (["params", "--method", "lora", "--rank", "0"], "rank must be a positive integer"),
    (["params", "--method", "bitfit"], "BitFit trains bias terms only"),
    (["params", "--model", "gpt2", "--target", "nope"], "matches no"),
    (["params", "--method", "prefix", "--prefix-length", "0"], "length"),
    (["params", "--method", "adapter", "--bottleneck", "-1"], "bottleneck"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmlab: error:") and message in err
