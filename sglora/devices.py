"""Device names as the CLI and the service take them: 'auto', 'cpu', 'cuda' or 'cuda:N'; what running out
of memory on one looks like."""

from __future__ import annotations

import re
import sys

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str, what: str = "device") -> str:
    """``name`` if it is a device name this project runs on; ValueError naming ``what`` otherwise. No torch."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"{what}: unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return name


def resolve_device(name: str, what: str = "device") -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; an explicit CUDA device must exist. ValueError
    naming ``what`` and the problem (unknown name, no CUDA, no such GPU)."""
    import torch

    check_device_name(name, what)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch has no CUDA" if torch.version.cuda is None else "no GPU or no driver"
            raise ValueError(f"{what}={name}: CUDA is not available ({why}); use cpu or auto")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"{what}={name}: there are {torch.cuda.device_count()} CUDA device(s)")
    return name


def error_line(e: BaseException) -> str:
    """``e`` in one line, for a log or a message: its type and its message's first line."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says that memory ran out: a GPU's torch.OutOfMemoryError, the CPU allocator's failure (a
    plain RuntimeError in torch) or Python's MemoryError. Imports no torch (the CLI's --help)."""
    torch = sys.modules.get("torch")  # not loaded: no torch error can have been raised
    if isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError)):
        return True
    return type(e) is RuntimeError and "DefaultCPUAllocator: can't allocate memory" in str(e)
