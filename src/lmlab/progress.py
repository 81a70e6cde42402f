"""Progress bars, drawn only when stderr is a terminal: logs, pipes and CI get no carriage-return
noise, and a bar never shares a line with a warning (the CLI prints warnings through ``tqdm.write``)."""

from __future__ import annotations

from contextlib import contextmanager


def bar(iterable=None, *, total: int | None = None, enabled: bool = True, desc: str | None = None,
        unit: str = "it", initial: int = 0):
    """A tqdm bar over ``iterable`` (or updated by hand up to ``total``); off unless ``enabled`` and
    stderr is a terminal (tqdm's ``disable=None``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, initial=initial, disable=None if enabled else True, desc=desc, unit=unit,
                dynamic_ncols=True)


@contextmanager
def transformers_bars_off():
    """No transformers progress bar ("Loading weights", "Writing model shards") inside the block,
    which it would draw even when stderr is no terminal; restored afterwards."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
