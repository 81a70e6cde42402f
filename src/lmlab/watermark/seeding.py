"""How a red-list watermark turns context into a green list: the seeding schemes.

A scheme maps a window of token ids to a PRNG seed; the green list is the first ⌊γ|V|⌋ entries of
``torch.randperm(|V|)`` drawn from a CPU generator with that seed. Three families:

- ``simple_1`` / ``lefthash`` (reference and transformers, context width 1): seed = key × previous
  token (the reference's ``additive_prf`` over one token; transformers' ``set_seed`` for lefthash).
- ``selfhash`` (the reference's ``algorithm-3``: ``anchored_minhash_prf``, context width 4,
  self-salted): the window is the 3 previous tokens and the candidate itself;
  seed = min over the window of key × h(t) × h(candidate), h(t) = table[t mod 1000003] + 1 with the
  reference's table (``randperm(1000003)`` seeded 2971215073). A token is green when it lies in
  the list its own window seeds (Kirchenbauer et al. 2023b, "On the Reliability of
  Watermarks", Alg. 3). Generation tries the 41 likeliest candidates (the reference's ``fixed_compute``).
- ``hf-selfhash``: transformers' ``seeding_scheme="selfhash"``: the same formula over the last
  ``context_width`` tokens of (previous tokens + candidate), default width 1 (the candidate
  alone), with the table seeded by the key, and 40 candidates.

Products are int64 and wrap on overflow (key × h × h reaches ~1.5e19), as in both originals.

A user's own lists: ``load_green_list("file.py:function")`` (or ``"module:function"``) gives
``f(prev_token_id, vocab_size) -> green ids``; ``checked_green_ids`` validates what it returns.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from lmlab.errors import LmlabError

TABLE_SIZE = 1_000_003
REFERENCE_TABLE_SEED = 2971215073  # fib47, the reference's alternative_prf_schemes.py


@dataclass(frozen=True)
class Seeding:
    """A seeding scheme's shape: ``context`` previous tokens seed each list; a ``self_salt``ed
    list also includes the candidate token (which must then lie in its own list)."""

    name: str
    context: int
    self_salt: bool = False
    candidates: int = 0  # self-salted generation: how many of the likeliest tokens are tried
    table_seed: int | None = None  # self-salted: seed of the hash table (None: the key)


SCHEMES = ("simple_1", "lefthash", "selfhash", "hf-selfhash")


def seeding(name: str, context_width: int | None = None) -> Seeding:
    """The ``Seeding`` of a scheme name; ``context_width`` only for hf-selfhash (default 1)."""
    if name not in SCHEMES:
        raise LmlabError(f"unknown seeding scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    if context_width is not None and name != "hf-selfhash":
        raise LmlabError(f"a context width applies to hf-selfhash only ({name} has a fixed one)")
    if name in ("simple_1", "lefthash"):
        return Seeding(name, context=1)
    if name == "selfhash":
        return Seeding(name, context=3, self_salt=True, candidates=41, table_seed=REFERENCE_TABLE_SEED)
    width = 1 if context_width is None else context_width
    if width < 1:
        raise LmlabError(f"context width must be at least 1, got {width}")
    return Seeding(name, context=width - 1, self_salt=True, candidates=40)


@lru_cache(maxsize=4)
def fixed_table(seed: int) -> torch.Tensor:
    """(1000003,) int64: the hash table of the self-salted schemes, on the CPU."""
    rng = torch.Generator(device="cpu")
    rng.manual_seed(seed)
    return torch.randperm(TABLE_SIZE, generator=rng, device="cpu")


def seed_of(window: tuple[int, ...], scheme: Seeding, key: int) -> int:
    """The PRNG seed of a window (previous tokens, then the candidate when self-salted)."""
    if not scheme.self_salt:
        return (key * int(window[-1])) % (2**64 - 1)
    table = fixed_table(key if scheme.table_seed is None else scheme.table_seed)
    h = table[torch.tensor(window, dtype=torch.long, device="cpu") % TABLE_SIZE] + 1  # (len(window),)
    return (key * h * h[-1]).min().item() % (2**64 - 1)  # int64 products wrap, as in the originals


def seeded_green_ids(window: tuple[int, ...], scheme: Seeding, key: int, vocab_size: int,
                     green_size: int) -> torch.Tensor:
    """The green list a window seeds: the first ``green_size`` of a seeded ``randperm(|V|)``."""
    rng = torch.Generator(device="cpu")
    rng.manual_seed(seed_of(window, scheme, key))
    return torch.randperm(vocab_size, generator=rng, device="cpu")[:green_size]


# --- a user's own green lists --------------------------------------------------------------------

@lru_cache(maxsize=8)
def load_green_list(spec: str):
    """``"path/to/file.py:function"`` or ``"module:function"`` -> the function (runs the file: the
    user asked for their own code)."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise LmlabError(f"--green-list {spec!r}: expected FILE.py:function or module:function")
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise LmlabError(f"--green-list {spec}: no file {source}")
        module_spec = importlib.util.spec_from_file_location(f"lmlab_green_list_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: any error becomes one line
            raise LmlabError(f"--green-list {spec}: running {source} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise LmlabError(f"--green-list {spec}: cannot import {source}: {exc}") from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise LmlabError(f"--green-list {spec}: {source} has no function {name!r}")
    return function


def checked_green_ids(function, spec: str, previous: int, vocab_size: int) -> torch.Tensor:
    """The user's green ids after ``previous``, checked: integers in [0, |V|), at least one, not all
    of the vocabulary; duplicates count once (a list is a set)."""
    where = f"--green-list {spec}: f({previous}, {vocab_size})"
    try:
        result = function(previous, vocab_size)
        if not isinstance(result, torch.Tensor):  # an array whole: a list of numpy ints converts one by one
            result = np.asarray(result if hasattr(result, "__array__") else list(result))
        ids = torch.as_tensor(result, device="cpu")  # the lists live on the CPU, whatever the default device
    except Exception as exc:
        raise LmlabError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
    if ids.numel() == 0:
        ids = ids.long()  # an empty list has no dtype to speak of
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex() or ids.dim() != 1:
        raise LmlabError(f"{where} must return a sequence of integer token ids, got {ids.dtype} of shape "
                         f"{tuple(ids.shape)}")
    ids = ids.long().unique()
    if len(ids) == 0 or len(ids) >= vocab_size:
        raise LmlabError(f"{where} returned {len(ids)} distinct ids; a green list needs between 1 and |V| - 1")
    if ids[0] < 0 or ids[-1] >= vocab_size:
        raise LmlabError(f"{where} returned id {int(ids[0] if ids[0] < 0 else ids[-1])}, outside [0, {vocab_size})")
    return ids
