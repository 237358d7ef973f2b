"""A model's repeated blocks, as the memory and speed modes find them (block swap, fp8 storage, compilation).

A model declares which of its ModuleLists repeats by name (``repeated_blocks = "transformer_blocks"``); those
modes work from that declaration and know nothing of model families.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import DiffusmithError

__all__ = ["gib", "repeated_blocks", "tensors_of"]


def repeated_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList a model declares by name in its ``repeated_blocks`` attribute."""
    name = getattr(model, "repeated_blocks", None)
    blocks = getattr(model, name, None) if isinstance(name, str) else None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise DiffusmithError(f"{type(model).__name__} declares no repeated blocks (a 'repeated_blocks' attribute "
                              "naming a non-empty ModuleList); block swap, fp8 storage and --compile need one")
    return blocks


def tensors_of(module: nn.Module) -> list[torch.Tensor]:
    """A module's parameters and buffers."""
    return [*module.parameters(), *module.buffers()]


def gib(tensors: Iterable[torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30
