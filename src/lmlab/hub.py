"""The Hugging Face hub, asked only when it can answer: an offline machine or a mistyped name
fails in one line at once (with the nearest known name) instead of after a minute of retries."""

from __future__ import annotations

from contextlib import contextmanager


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers within ``timeout`` seconds (False when offline mode is set)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def in_hf_cache(repo_id: str) -> bool:
    """Whether a model repo's config is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def in_datasets_cache(name: str) -> bool:
    """Whether ``datasets`` has prepared the hub data set ``name`` before (its cache folder exists)."""
    from pathlib import Path

    import datasets

    folder = name.replace("/", "___")
    root = Path(datasets.config.HF_DATASETS_CACHE)
    return root.is_dir() and any(p.name.lower() == folder.lower() or p.name.lower().endswith("___" + folder.lower())
                                 for p in root.iterdir())


@contextmanager
def offline():
    """``datasets`` and ``huggingface_hub`` read from their caches only, for the duration."""
    import datasets
    from huggingface_hub import constants

    was = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = was


def did_you_mean(name: str, known) -> str:
    """`` (did you mean X?)`` for the known name closest to a mistyped one, else ''."""
    import difflib

    known = list(known)
    close = difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {next(k for k in known if k.lower() == close[0])}?)"


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` with no file suffix and no path syntax: what the hub names a repo, and not a
    local path whose folder exists (``runs/finetune`` mistyped is "no checkpoint", not a download)."""
    import re
    from pathlib import Path

    if Path(name.split("/")[0]).exists():
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) is not None and not name.endswith(
        (".json", ".jsonl", ".txt", ".safetensors"))


def download_adapter(repo_id: str):
    """The local folder of a PEFT adapter on the hub (its config and weights only); from the cache
    when offline, one line at once when it is in neither."""
    from pathlib import Path

    from huggingface_hub import snapshot_download

    from lmlab.errors import LmlabError

    import sys

    reachable = hub_reachable()
    if reachable:  # say where weights come from before anything is downloaded
        print(f"lmlab: {repo_id} is not a local folder: fetching the adapter from the hub", file=sys.stderr)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["adapter_config.json", "adapter_model.safetensors",
                                                                "*.json", "*.model", "*.txt"],
                                      local_files_only=not reachable))
    except Exception as exc:  # noqa: BLE001 - the hub client raises many kinds for "not there"
        where = "the hub" if reachable else "the local cache (the hub is unreachable)"
        raise LmlabError(f"adapter {repo_id!r}: not a local folder, and not in {where} "
                         f"({type(exc).__name__})") from None
