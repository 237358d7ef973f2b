"""Where models live: all on the device, one model at a time, or streamed one block at a time.

- ``none``: every model stays on the compute device.
- ``model``: models wait in CPU memory; ``load_models_to_device(names)`` moves just the named ones over.
- ``sequential``: weights stay in (pinned) CPU memory and each block / layer is copied to the device just
  before it runs and dropped right after. A model with repeated blocks (the DiT) streams them through block
  swap with no block resident: the next block is copied on a side CUDA stream while the current one
  computes, so two blocks of device memory at most, and its few modules outside the blocks stay on the device.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import DiffusmithError
from . import memory

OFFLOAD_DEVICE = torch.device("cpu")


class OffloadMode(str, enum.Enum):
    NONE = "none"
    MODEL = "model"
    SEQUENTIAL = "sequential"

    @classmethod
    def parse(cls, value: OffloadMode | str | None) -> OffloadMode:
        if isinstance(value, cls):
            return value
        try:
            return cls(value or "none")
        except ValueError:
            raise DiffusmithError(f"unknown offload mode {value!r}: use none, model or sequential") from None


class _Streamer:
    """Copies one module's tensors to the device before its forward and points them back after."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.device = device
        self.tensors: list[tuple[Any, torch.Tensor]] = []
        pin = device.type == "cuda" and torch.cuda.is_available()
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            host = t.data.to(OFFLOAD_DEVICE)
            if pin:
                host = host.pin_memory()
            t.data = host
            self.tensors.append((t, host))
        module.register_forward_pre_hook(self.onload)
        module.register_forward_hook(self.offload)

    def onload(self, module: nn.Module, args: Any) -> None:
        for t, host in self.tensors:
            t.data = host.to(self.device, non_blocking=True)

    def offload(self, module: nn.Module, args: Any, output: Any) -> None:
        # weights are not changed by inference: drop the device copy, the host copy is still the truth
        for t, host in self.tensors:
            t.data = host


def enable_sequential_offload(model: nn.Module, device: torch.device, blocks_on_device: int = 0) -> None:
    """Stream ``model`` to ``device`` as it runs.

    A model with repeated blocks (declared as ``repeated_blocks``, the name of a ModuleList) gets block swap
    (:func:`diffusmith.core.memory.enable_block_swap`): its last ``blocks_on_device`` blocks stay on the
    device, each other block is copied there while the one before it computes, and the modules outside the
    blocks move to the device for good. Any other model moves module by module, each module with own tensors
    just before it runs."""
    if getattr(model, "repeated_blocks", None):
        memory.enable_block_swap(model, device, blocks_on_device=blocks_on_device)
        return
    for module in model.modules():
        has_own = any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False))
        if has_own:
            _Streamer(module, device)


def check_block_swap(mode: OffloadMode, block_swap: int | None) -> OffloadMode:
    """The offload mode that ``block_swap`` (blocks of the denoiser kept on the device, the rest streamed)
    asks for: sequential; None leaves ``mode`` as it is."""
    if block_swap is None:
        return mode
    memory.check_block_count(block_swap)
    if mode is OffloadMode.MODEL:
        raise DiffusmithError("--block-swap streams the DiT's other blocks, which --offload model moves whole: "
                              "use --block-swap with --offload sequential (or alone)")
    return OffloadMode.SEQUENTIAL


class ModelPlacer:
    """Applies an offload mode to the models of a pipeline (``block_swap``: with ``sequential``, the blocks of
    a model with repeated blocks that stay on the device)."""

    def __init__(self, pipe: Any, mode: OffloadMode, block_swap: int | None = None):
        self.pipe = pipe
        self.mode = check_block_swap(mode, block_swap)
        self.blocks_on_device = block_swap or 0

    def place_all(self) -> None:
        """Initial placement, once the models are loaded (CPU-resident after loading)."""
        for model in self.pipe.models().values():
            if self.mode is OffloadMode.NONE:
                model.to(self.pipe.device)
            elif self.mode is OffloadMode.SEQUENTIAL:
                enable_sequential_offload(model, self.pipe.device, self.blocks_on_device)
            else:
                model.to(OFFLOAD_DEVICE)

    def onload(self, names: Iterable[str]) -> None:
        if self.mode is not OffloadMode.MODEL:
            return
        wanted = set(names)
        unknown = wanted - set(self.pipe.model_names)
        if unknown:
            raise KeyError(f"load_models_to_device: unknown model name(s) {sorted(unknown)}")
        models = self.pipe.models()
        for name, model in models.items():  # free first, then fill, so peak memory stays low
            if name not in wanted:
                model.to(OFFLOAD_DEVICE)
        for name in wanted:
            if name in models:
                models[name].to(self.pipe.device)
