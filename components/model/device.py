"""Device and precision, decided in one place from what the machine has."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def select_device(preference: str = "auto") -> str:
    """Return the device to use: the preference if given, else CUDA, then MPS, then CPU."""
    import torch

    if preference != "auto":
        if preference == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
        return preference
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def select_compute_dtype(device: str, requested: str = "auto") -> torch.dtype:
    """The dtype for matrix multiplications.

    bfloat16 on a CUDA device that supports it; float32 elsewhere, because bfloat16 matmuls
    on a typical CPU are an order of magnitude slower than float32 (measured ~15x for QLoRA).
    """
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device == "cuda":
        return torch.float16
    return torch.float32
