"""Parsing user-facing device and dtype names."""

from __future__ import annotations

import torch

from ..errors import DiffusmithError

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise DiffusmithError(f"unsupported dtype {dtype}: use fp32, bf16 or fp16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise DiffusmithError(f"unknown dtype {dtype!r}: use fp32, bf16 or fp16")
    return DTYPES[key]


def resolve_device(device: torch.device | str) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DiffusmithError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffusmithError("device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DiffusmithError(f"device {device} does not exist: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise DiffusmithError(f"unsupported device {device}: use cpu or cuda")
    return device
