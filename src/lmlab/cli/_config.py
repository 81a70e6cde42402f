"""``--config FILE``: a command's options from a TOML, YAML or JSON file.

Keys are the flag names (``lr``, ``max-iters`` or ``max_iters``; a positional by its name); a flag
on the command line wins over the file (a switch the file turns on stays on: argparse switches
have no ``--no-`` form); an unknown key is an error that names it. A run's
``run.json`` is itself a config (its ``options``), so ``--config RUN/run.json --out-dir NEW``
repeats the run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.errors import LmlabError

CONFIG_COMMANDS = ("finetune", "dpo", "evaluate", "sweep")


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="options from a TOML, YAML or JSON file (keys are the flag names; flags given here "
                        "win; a run's run.json repeats that run)")


def read_config(path: str | Path) -> dict:
    """The options in ``path``: a table of flag names, or a run.json's ``options``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmlabError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LmlabError(f"--config {path}: cannot read it as UTF-8 text ({exc})") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise LmlabError("--config: reading TOML on Python 3.10 needs tomli: pip install tomli") from None
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise LmlabError("--config: reading YAML needs PyYAML: pip install pyyaml") from None
            data = yaml.safe_load(text)
        elif suffix == ".json":
            import json

            data = json.loads(text)
        else:
            raise LmlabError(f"--config {path}: expected a .toml, .yaml, .yml or .json file")
    except LmlabError:
        raise
    except Exception as exc:  # noqa: BLE001 - each parser has its own error type
        raise LmlabError(f"--config {path}: not valid {suffix[1:].upper()} ({' '.join(str(exc).split())[:200]})") \
            from None
    if isinstance(data, dict) and isinstance(data.get("options"), dict):  # a run's run.json
        data = data["options"]
    if not isinstance(data, dict):
        raise LmlabError(f"--config {path}: expected a table of options at the top level")
    return data


def _config_path(argv: list[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == "--config":
            if i + 1 >= len(argv):
                return None  # argparse reports the missing value
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]):
    """(name, parser) of the subcommand ``argv`` names, or (None, None)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = next((t for t in argv if not t.startswith("-")), None)
            return (name, action.choices[name]) if name in action.choices else (None, None)
    return None, None


def apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Set the defaults of the command ``argv`` names from its ``--config`` file (if any), so
    flags on the command line override them. Unknown keys and values of the wrong kind are one
    error each, before anything runs."""
    path = _config_path(argv)
    if path is None:
        return
    name, command = _command_parser(parser, argv)
    if command is None or name not in CONFIG_COMMANDS:
        return  # argparse refuses --config where it is not an option
    options = read_config(path)
    by_key: dict[str, argparse.Action] = {}
    for action in command._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.dest == "config":
            continue
        keys = {action.dest, *(s.lstrip("-") for s in action.option_strings)}
        if not action.option_strings and action.metavar:
            keys.add(str(action.metavar).lower())
        for key in keys:
            by_key[key.replace("-", "_")] = action
    defaults = {}
    for key, value in options.items():
        action = by_key.get(str(key).lstrip("-").replace("-", "_"))
        if action is None:
            raise LmlabError(f"--config {path}: unknown option {key!r} for lmlab {name}")
        if value is None:  # as in a run.json: the default
            continue
        defaults[action.dest] = _value(action, value, key, path)
        action.required = False  # given by the file
    command.set_defaults(**defaults)


def _value(action: argparse.Action, value, key, path):
    """``value`` as the flag would have parsed it (its type and choices)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise LmlabError(f"--config {path}: {key} is a switch: true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        values = value if isinstance(value, list) else [value]
        return [_one(action, v, key, path) for v in values]
    if isinstance(value, (list, dict)):
        raise LmlabError(f"--config {path}: {key} takes one value, got {value!r}")
    return _one(action, value, key, path)


def _one(action: argparse.Action, value, key, path):
    if isinstance(value, bool) and action.choices is not None and {"on", "off"} <= set(action.choices):
        value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
    if action.type is not None:
        try:
            value = action.type(str(value) if not isinstance(value, str) else value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise LmlabError(f"--config {path}: {key}: {exc}") from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise LmlabError(f"--config {path}: {key} must be one of {', '.join(map(str, action.choices))}, "
                         f"got {value!r}")
    return value
