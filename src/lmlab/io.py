"""Atomic file writes: a killed process leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from lmlab.errors import LmlabError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give the final file the usual umask permissions."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else delete it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise LmlabError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        _public(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_safe(obj):
    """``obj`` with every non-finite float (inf, nan) as None, so that it is valid JSON (null)."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    """Valid JSON (non-finite numbers as null), atomically."""
    write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """Save a dict of tensors as safetensors, atomically (contiguous copies, shared storage split)."""
    from safetensors.torch import save_file

    # copies on the CPU: a GPU model's weights are not duplicated on the GPU while they are written
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_tensors(path: str | os.PathLike) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise LmlabError(f"no such file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:  # a damaged or foreign file (safetensors holds no code)
        raise LmlabError(f"{path}: not a safetensors file ({' '.join(str(exc).split())[:120]})") from None


def load_torch(path: str | os.PathLike):
    """``torch.load`` of tensors and plain containers only (``weights_only``, on the CPU): a file that
    holds other pickled objects, which could run code when unpickled, is one error and is not run."""
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise LmlabError(f"no such file: {path}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        why = "it holds pickled Python objects besides tensors, which lmlab does not load" \
            if isinstance(exc, pickle.UnpicklingError) else " ".join(str(exc).split())[:120]
        raise LmlabError(f"{path}: not a tensor file ({why})") from None


def _json_value(text: str, where: str):
    """``json.loads``, every way it can fail one LmlabError (an integer over 4300 digits is a
    ValueError, deep nesting a RecursionError, neither a JSONDecodeError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LmlabError(f"{where} is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(":")[0]
        raise LmlabError(f"{where} is not valid JSON: {why}") from None


def read_json(path: str | os.PathLike):
    if not Path(path).is_file():
        raise LmlabError(f"no such file: {path}")
    try:
        return _json_value(Path(path).read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as exc:
        raise LmlabError(f"{path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise LmlabError(f"cannot read {path}: {exc.strerror or exc}") from None


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` as a whole.

    The old folder is moved to ``.<name>.old`` first and removed after the swap; if a kill lands
    between the two renames, ``committed_dir`` finds the old one, so a complete folder always exists.
    """
    import shutil

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise LmlabError(f"cannot write {path}: {exc.strerror or exc}") from None
    old = path.with_name(f".{path.name}.old")
    try:
        yield tmp
        _public(tmp, directory=True)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def committed_dir(path: str | os.PathLike) -> Path | None:
    """``path`` if it exists, else the ``.old`` copy an interrupted ``atomic_dir`` swap left behind."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    return path if path.exists() else old if old.exists() else None


def write_jsonl(path: str | os.PathLike, records) -> None:
    """One JSON object per line, atomically."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def save_npy(path: str | os.PathLike, array) -> None:
    """``numpy.save`` atomically (through a file handle: given a path, numpy would append .npy)."""
    import numpy as np

    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)

    write_atomic(path, writer)


def read_texts(path: str | os.PathLike, field: str = "text") -> list[str]:
    """A list of texts from any of the shapes people keep them in.

    .json: a list of strings or an object with a ``texts`` list; .jsonl: one object per line with
    a ``field`` (default ``text``) string, or one JSON string per line; .npy: a 1-D array of
    strings; anything else: UTF-8 text, one text per line (empty lines skipped).
    """
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False)  # object arrays (pickles) are refused, never run
        except (ValueError, OSError, EOFError) as exc:
            raise LmlabError(f"{path}: not a numpy array of strings ({' '.join(str(exc).split())[:120]})") from None
        if not isinstance(array, np.ndarray):  # an .npz archive under an .npy name
            array.close()
            raise LmlabError(f"{path}: not a numpy array of strings (an .npz archive)")
        if array.ndim != 1 or array.dtype.kind not in "US":
            raise LmlabError(f"{path}: expected a 1-D array of strings, got shape {array.shape} dtype {array.dtype}")
        try:
            return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in array.tolist()]
        except UnicodeDecodeError as exc:
            raise LmlabError(f"{path}: a byte string is not UTF-8 text ({exc.reason})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LmlabError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise LmlabError(f"cannot read {path}: {exc.strerror or exc}") from None
    if suffix == ".json":
        obj = _json_value(text, str(path))
        texts = obj.get("texts") if isinstance(obj, dict) else obj
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise LmlabError(f"{path}: expected a JSON list of strings or an object with a 'texts' list of strings")
        return texts
    if suffix == ".jsonl":
        texts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            obj = _json_value(line, f"{path}:{n}")
            value = obj.get(field) if isinstance(obj, dict) else obj
            if not isinstance(value, str):
                raise LmlabError(f"{path}:{n}: expected an object with a string {field!r} field")
            texts.append(value)
        return texts
    return [line for line in text.splitlines() if line.strip()]
