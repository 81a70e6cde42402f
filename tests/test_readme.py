"""Every command line the README writes is one lmlab accepts, so the README cannot drift from the
code: each is parsed by the real parser, and the calculators (no model, no data) run as written."""

import re
import shlex
from pathlib import Path

import pytest

from lmlab.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"


def _logical_lines(block: list[str]):
    """Lines of a shell block with ``\\`` continuations joined, ``for x in a b; do ... done`` loops
    unrolled and the block's own ``NAME=value`` variables expanded."""
    joined, buf = [], ""
    for line in block:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        joined.append(buf + line)
        buf = ""
    variables, out, loop = {}, [], None
    for line in joined:
        text = line.strip()
        if text.startswith("$ "):
            text = text[2:]
        assignment = re.fullmatch(r"([A-Z_]+)=(\"?)(.*)\2", text)
        if assignment:
            variables[assignment.group(1)] = _expand(assignment.group(3), variables)
            continue
        loop_head = re.fullmatch(r"for (\w+) in (.*); do", text)
        if loop_head:
            loop = (loop_head.group(1), loop_head.group(2).split(), [])
            continue
        if text == "done" and loop:
            name, values, body = loop
            out += [_expand(b, {**variables, name: v}) for v in values for b in body]
            loop = None
            continue
        if loop:
            loop[2].append(text)
        else:
            out.append(_expand(text, variables))
    return out


def _expand(text: str, variables: dict) -> str:
    return re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), text)


def _lmlab_argv(line: str):
    """The lmlab argument lists of one shell line (``a && b; c``, ``accelerate launch -m lmlab.cli``)."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return
    command: list[str] = []
    for token in [*tokens, "&&"]:
        if token in ("&&", ";", "|"):
            if command and command[0] == "lmlab":
                yield command[1:]
            elif "lmlab.cli" in command:
                yield command[command.index("lmlab.cli") + 1:]
            command = []
        else:
            command.append(token)


def readme_commands() -> list[tuple[int, list[str]]]:
    """(README line, argv) of every lmlab command in its shell blocks, and of every inline code span
    that is a whole command with options (not a synopsis with ``[optional]`` parts, ``a|b`` choices
    or ``...``)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    found, block, start, shell = [], None, 0, False
    for n, line in enumerate(lines, 1):
        if line.startswith("```"):
            if block is None:
                block, start, shell = [], n, line.strip() in ("```bash", "```sh", "```")
            else:
                if shell:
                    found += [(start, argv) for text in _logical_lines(block) for argv in _lmlab_argv(text)]
                block = None
            continue
        if block is not None:
            block.append(line)
            continue
        for span in re.findall(r"`(lmlab [^`]+)`", line):
            if " -" in span and not re.search(r"\[|\||\.\.\.|\\", span):  # a name alone is no command
                found += [(n, argv) for argv in _lmlab_argv(span)]
    return found


COMMANDS = readme_commands()


def test_the_readme_has_commands():
    names = {argv[0] for _, argv in COMMANDS if argv}
    assert {"finetune", "evaluate", "generate", "dpo", "prompt", "watermark", "params", "scaling", "memory",
            "data", "bpe"} <= names
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("line,argv", COMMANDS, ids=[f"README:{n}:{' '.join(a)[:60]}" for n, a in COMMANDS])
def test_every_readme_command_parses(line, argv, capsys):
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # --version and --help end the parse with status 0
        if exc.code == 0:
            return
        pytest.fail(f"README line {line}: lmlab {' '.join(argv)}\n{capsys.readouterr().err}")


CALCULATORS = [(n, a) for n, a in COMMANDS if a and a[0] in ("params", "memory", "scaling") and "--runs" not in a]


@pytest.mark.parametrize("line,argv", CALCULATORS, ids=[f"README:{n}:{' '.join(a)[:60]}" for n, a in CALCULATORS])
def test_readme_calculator_commands_run(line, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a --plot lands here
    assert main(argv) == 0, f"README line {line}: {capsys.readouterr().err}"
