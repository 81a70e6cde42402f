"""Shared fixtures: tiny randomly initialised GPT-2 and Llama models (fast, deterministic, offline)."""

import pytest
import torch

from lmlab.models import build_model, preset_config

FAMILIES = ["tiny-gpt2", "tiny-llama"]


def tiny(name: str, seed: int = 0):
    return build_model(preset_config(name), seed=seed)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).logits


def randomize(params, std: float = 0.1) -> None:
    """Give zero-initialised method weights random values so tests are not vacuous."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)
