"""fp8 storage of the frozen Linear weights in a model's repeated blocks, upcast one layer at a time.

Each weight is stored in float8 with one scale per output row and upcast when its layer runs. Apply it
after the LoRA is injected (the LoRA's own weights stay as they are), before block swap and compilation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiffusmithError
from .blocks import repeated_blocks

__all__ = ["Fp8Linear", "enable_fp8_storage"]

logger = logging.getLogger(__name__)


# An opaque op (not an autograd.Function): torch.compile keeps it whole, so what autograd saves for
# backward is always the fp8 weight and its scales, passed through the saved-tensor hooks (block swap's,
# checkpointing's), never an upcast copy.
@torch.library.custom_op("diffusmith::fp8_linear", mutates_args=())
def _fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
    """``x @ (scale[:, None] * weight)^T + bias`` computed in ``dtype``, the weight upcast for this call only."""
    out = F.linear(x.to(dtype), weight.to(dtype)) * scale.to(dtype)  # the scale is per output row
    return out if bias is None else out + bias.to(dtype)


@_fp8_linear.register_fake
def _fp8_linear_fake(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype)


def _fp8_linear_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, scale, bias, dtype = inputs
    ctx.save_for_backward(weight, scale)
    ctx.dtype, ctx.x_dtype = dtype, x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _fp8_linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    weight, scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = ((grad.to(ctx.dtype) * scale.to(ctx.dtype)) @ weight.to(ctx.dtype)).to(ctx.x_dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None


_fp8_linear.register_autograd(_fp8_linear_backward, setup_context=_fp8_linear_setup)


def _quantize(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 weight, float32 scale per output row)`` such that ``fp8 * scale[:, None]`` is ``weight`` up to
    fp8 rounding; each row uses fp8's full range."""
    with torch.no_grad():
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / torch.finfo(dtype).max  # (out,)
        return (w / scale[:, None]).to(dtype), scale


class Fp8Linear(nn.Module):
    """A frozen Linear whose weight is stored in float8 with a per-output-row scale (``weight * scale[:, None]``
    is the original weight up to fp8 rounding). It computes in the input's dtype (or the autocast dtype).

    The ``weight`` key of its state dict holds the fp8 values; the scales are not saved (non-persistent),
    so convert a model after loading its weights, not before."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = _quantize(linear.weight.detach(), dtype)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias  # kept as it is (same parameter)
        self.register_buffer("weight_scale", scale, persistent=False)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer computes with."""
        return self.weight.float() * self.weight_scale[:, None]

    @torch.no_grad()
    def add_(self, delta: torch.Tensor) -> None:
        """Add ``delta`` (``(out, in)``) to the weight in place (a merged LoRA): the sum is taken in float32 and
        stored in fp8 again with new row scales, in the same tensors (offload hooks keep pointing at them)."""
        weight, scale = _quantize(self.dequantized_weight() + delta.to(self.weight.device), self.weight.dtype)
        self.weight.copy_(weight)
        self.weight_scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        return _fp8_linear(x, self.weight, self.weight_scale, self.bias, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.weight.dtype}")


def _float8_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    elif dtype is None:
        dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise DiffusmithError(f"this torch ({torch.__version__}) has no float8 dtypes; fp8 weight storage needs "
                              "torch >= 2.1: upgrade torch or leave out --fp8-base / --fp8")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize != 1:
        raise DiffusmithError(f"fp8 storage needs a float8 dtype (e.g. torch.float8_e4m3fn), got {dtype}")
    return dtype


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) or f".{s}." in f".{name}." for s in skip)


def enable_fp8_storage(model: nn.Module, dtype: torch.dtype | str | None = None,
                       skip: Iterable[str] = ()) -> list[str]:
    """Store every frozen ``nn.Linear`` weight inside ``model``'s repeated blocks in float8 (default
    ``torch.float8_e4m3fn``), with one float32 scale per output row; the weight is upcast when its layer runs.

    For a LoRA layer the frozen base layer is converted and the LoRA weights are left as they are.
    Biases keep their dtype. ``skip`` lists module names (or name suffixes, as LoRA targets are written)
    left in full precision. Apply it after the LoRA is injected (converted layers are no ``nn.Linear`` a
    LoRA could target) and do not cast the model with ``.to(dtype)`` afterwards. Returns the converted names.
    """
    dtype = _float8_dtype(dtype)
    skip = list(skip)
    blocks = repeated_blocks(model)
    converted: list[str] = []
    for block_index, block in enumerate(blocks):
        for name, module in list(block.named_modules()):
            if not isinstance(module, nn.Linear) or module.weight.requires_grad:
                continue
            if any(part.startswith("lora_") for part in name.split(".")):  # a LoRA layer's own Linears
                continue
            full_name = f"{model.repeated_blocks}.{block_index}.{name}"
            if _skipped(full_name, skip):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, attr, Fp8Linear(module, dtype))
            converted.append(full_name)
    if not converted:
        raise DiffusmithError(f"no frozen Linear layer in the {type(model).__name__}'s blocks to store in fp8 "
                              "(with --full every weight trains): leave out --fp8-base / --fp8")
    logger.info("fp8 storage (%s): %d Linear weights", str(dtype).removeprefix("torch."), len(converted))
    return converted
