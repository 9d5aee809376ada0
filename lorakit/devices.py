"""Where tensor work runs: one meaning of ``auto`` for every command and API."""

from __future__ import annotations

import os

import torch

from .errors import BackendUnavailable

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """``auto``: the CUDA GPU when torch sees one, else the CPU; ``cuda`` without a GPU fails with one line."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("--device cuda: no CUDA device is available to torch here; use --device cpu or auto")
    if device not in DEVICES:
        raise BackendUnavailable(f"unknown device {device!r}; choose {', '.join(DEVICES)}")
    return torch.device(device)


def streaming_threads() -> int:
    """Compute threads for a streaming command: one core is left to the I/O threads (on 2 cores one
    compute thread merged faster: buffered I/O ~15 %, direct I/O ~5 %, and a second OpenMP thread
    spun idle for as long as the merge ran). The CLI applies it; a library call never changes the
    process-wide setting."""
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1))


def cpu_workers() -> int:
    """Threads that patch chunks of one tensor at once on the CPU: the cores torch's own threads
    leave free (the CLI's one compute thread on 2 cores: 2 workers; a library caller's torch
    using every core: 1, and torch parallelises each product instead). The workers' kernels and
    products release the GIL."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // torch.get_num_threads())
