"""Where a model runs and in which precision: decided once, where the model is loaded.

``--device auto`` takes CUDA, then Apple's MPS, then the CPU; ``--dtype auto`` takes bf16 on a
CUDA GPU that supports it natively, else fp16 there, and fp32 on a CPU or an Apple GPU (bf16
matmuls are ~400x slower than fp32 on the 2-core AVX2 machines lmlab is developed on). Everything lmlab builds on the way to the model
(batches, masks, caches, label ids, watermark masks) follows ``model_device(model)``.

Random state: ``rng_state`` / ``set_rng_state`` cover the CPU generator and every CUDA device's,
so a resumed run draws the same dropout masks on a GPU as it would have without the stop.
"""

from __future__ import annotations

import os
import sys

import torch

from lmlab.errors import LmlabError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def warn(message: str) -> None:
    """A human line on stderr (results go to stdout)."""
    print(f"lmlab: warning: {message}", file=sys.stderr, flush=True)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def select_device(name: str = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu. Asking for a device that is not there is one clear error.

    Under ``accelerate launch`` / torchrun each process takes its own GPU (``cuda:$LOCAL_RANK``),
    and a chosen CUDA device becomes the current one, so that loading, accelerate and the CUDA
    generator all use it."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise LmlabError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        else:
            return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LmlabError(f"--device {name}: this machine has no CUDA device usable by torch "
                             f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
        index = torch.device(name).index
        if index is None:
            index = int(os.environ.get("LOCAL_RANK", "0"))
        if index >= torch.cuda.device_count():
            raise LmlabError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if name == "mps" and not _mps_available():
        raise LmlabError("--device mps: Apple's MPS backend is not available here; use --device cpu")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 (not emulated: a V100 or T4 would run it slowly) on this device."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu"


def select_dtype(name: str, device: torch.device, *, warn_slow: bool = True) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, else fp16 on a GPU, fp32 on the CPU.

    bf16 / fp16 on a CPU are allowed (a user may want to see the numbers) but warned about: they run
    far slower than fp32 there."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if bf16_supported(device) else torch.float16
        return torch.float32  # CPU; and MPS, whose half-precision training varies by macOS and torch
    if name not in DTYPES:
        raise LmlabError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not bf16_supported(device):
        raise LmlabError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no native bf16; use fp16")
    if dtype != torch.float32 and device.type == "cpu" and warn_slow:
        warn(f"--dtype {name} on the CPU is far slower than fp32 there (bf16 matmuls were ~400x slower on "
             "an AVX2 CPU); fp32 is the CPU default")
    return dtype


FP16_OVERFLOW = ("t5", "mt5", "umt5", "longt5")  # why transformers keeps their feed-forward `wo` in fp32


def model_dtype(dtype: torch.dtype, config, *, quiet: bool = False) -> torch.dtype:
    """``dtype``, unless it is fp16 and the model's activations overflow fp16 (T5's feed-forward
    passes 65504: NaN losses, no best checkpoint, empty generations): then fp32, said once in a
    warning unless ``quiet`` (a second look at the same model)."""
    model_type = getattr(config, "model_type", None)
    if dtype != torch.float16 or model_type not in FP16_OVERFLOW:
        return dtype
    if not quiet:
        warn(f"{model_type} models overflow in fp16 (NaN losses): running in fp32; on a GPU with bf16, "
             "--dtype bf16 is faster")
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def mixed_precision(dtype: torch.dtype) -> str:
    """accelerate's ``mixed_precision`` for a compute dtype: autocast (and loss scaling for fp16)."""
    return {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def model_device(model) -> torch.device:
    """The device of the model's parameters (the first one; lmlab keeps a model on one device)."""
    return next(model.parameters()).device


def release_memory() -> None:
    """Free what a finished run left: Python cycles (accelerate binds the model's forward) and the
    CUDA caching allocator's blocks, so the next run of a sweep starts with the whole GPU."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def rng_state() -> dict:
    """The CPU generator and, where present, every CUDA device's and the MPS one (for resume)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state) -> None:
    """Restore ``rng_state()``'s result (a bare tensor is an older checkpoint's CPU state)."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            warn(f"the checkpoint holds {len(cuda)} CUDA generator states, this machine has "
                 f"{torch.cuda.device_count()} devices; dropout draws will differ from an uninterrupted run")
        else:
            torch.cuda.set_rng_state_all(cuda)
    if state.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def quantization_config(bits: int | None, device: torch.device, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for QLoRA (Dettmers et al. 2023: NF4, double
    quantisation, compute in ``compute_dtype``) or LLM.int8(); None for ``bits=None``."""
    if bits is None:
        return None
    if bits not in (4, 8):
        raise LmlabError(f"quantisation must be 4 or 8 bits, got {bits}")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise LmlabError(f"--load-in-{bits}bit needs bitsandbytes: pip install bitsandbytes")
    if device.type != "cuda":
        raise LmlabError(f"--load-in-{bits}bit needs a CUDA device (bitsandbytes' {bits}-bit kernels); "
                         f"this run is on {device.type}")
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "quantization_method", None))
