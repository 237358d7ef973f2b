"""Block swap: the frozen weights of all blocks but the last few wait in (pinned) CPU memory.

Each block's weights are copied to the device just before it runs (the next block's copy is prefetched on a
side CUDA stream meanwhile) and dropped after. Weights that autograd saves for backward are not kept on the
device either: they are re-copied when backward needs them. Trainable weights (a LoRA) and everything outside
the blocks stay on the device. The host copy of a swapped weight is the truth: nothing is ever copied back
from the device. Apply it after the LoRA is injected and fp8 storage, before compilation.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from ..errors import DiffusmithError
from .blocks import gib, repeated_blocks, tensors_of

__all__ = ["BlockSwap", "check_block_count", "enable_block_swap"]

logger = logging.getLogger(__name__)
HOST = torch.device("cpu")


def check_block_count(blocks_on_device: object) -> int:
    """``blocks_on_device`` if it is a valid ``--block-swap`` value (an int >= 0), else a one-line error."""
    if isinstance(blocks_on_device, bool) or not isinstance(blocks_on_device, int) or blocks_on_device < 0:
        raise DiffusmithError(f"--block-swap must be a number of blocks >= 0, got {blocks_on_device!r}")
    return blocks_on_device


class _HostRef:
    """What autograd keeps of a swapped weight it saved for backward: the host copy and the geometry of the
    saved tensor (often a view such as ``weight.t()``) on the device copy it was taken from."""

    __slots__ = ("host", "size", "stride", "offset")

    def __init__(self, host: torch.Tensor, saved: torch.Tensor):
        self.host = host
        self.size, self.stride, self.offset = saved.size(), saved.stride(), saved.storage_offset()


class _SwappedBlock:
    """One block whose frozen tensors live in host memory; ``copies`` holds their device copies while it runs."""

    def __init__(self, index: int, tensors: list[torch.Tensor], hosts: list[torch.Tensor]):
        self.index = index
        self.tensors = tensors
        self.hosts = hosts
        self.copies: list[torch.Tensor] | None = None


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed block being recomputed)."""
    current = getattr(torch._C, "_current_autograd_node", None)
    return current is not None and current() is not None


class BlockSwap:
    """Block swap on one model; made by :func:`enable_block_swap`.

    ``stats`` counts device copies: ``fetches`` (a block copied when it ran), ``prefetches`` (copied ahead
    of time, on a side stream when CUDA) and ``backward_fetches`` (a saved weight re-copied for backward).
    """

    def __init__(self, model: nn.Module, device: torch.device | str, blocks_on_device: int):
        check_block_count(blocks_on_device)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        blocks = repeated_blocks(model)
        swapped = list(range(max(0, len(blocks) - blocks_on_device)))
        self._check_trainable(blocks, swapped)
        self.stats = {"fetches": 0, "prefetches": 0, "backward_fetches": 0}
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pending: dict[int, tuple[list[torch.Tensor], Any]] = {}
        self._live: dict[tuple[str, int], torch.Tensor] = {}  # (device, storage address of a copy) -> host
        self._contexts: list[Any] = []
        self._held: list[_SwappedBlock] = []  # recomputed blocks whose backward may still read their weights
        self.blocks: dict[int, _SwappedBlock] = {}

        pin = self.device.type == "cuda"
        swapped_ids: set[int] = set()
        for i in swapped:
            frozen = [t for t in tensors_of(blocks[i]) if not t.requires_grad and id(t) not in swapped_ids]
            swapped_ids.update(id(t) for t in frozen)
            hosts = [self._host_copy(t, pin) for t in frozen]
            for t, host in zip(frozen, hosts, strict=True):
                t.data = host
            self.blocks[i] = _SwappedBlock(i, frozen, hosts)
        with torch.no_grad():
            for t in tensors_of(model):  # everything else: on the device, for good
                if id(t) not in swapped_ids:
                    t.data = t.data.to(self.device)

        for block in self.blocks.values():
            module = blocks[block.index]
            module.register_forward_pre_hook(functools.partial(self._before_block, block))
            module.register_forward_hook(functools.partial(self._after_block, block), always_call=True)
        model.register_forward_pre_hook(self._enter_model)
        model.register_forward_hook(self._exit_model, always_call=True)
        self.swapped_tensors = [t for b in self.blocks.values() for t in b.tensors]
        logger.info("block swap: %d of %d blocks in %sCPU memory (%.2f GiB), %d on %s", len(swapped), len(blocks),
                    "pinned " if pin else "", gib(self.swapped_tensors), len(blocks) - len(swapped), self.device)

    @staticmethod
    def _check_trainable(blocks: nn.ModuleList, swapped: list[int]) -> None:
        # trainable weights stay on the device; a block in which every weight trains has nothing to swap
        if any(all(p.requires_grad for p in blocks[i].parameters()) for i in swapped):
            raise DiffusmithError("block swap keeps frozen weights off the GPU; it does not work with --full "
                                  "(every block weight trains): use a LoRA, or leave out --block-swap")

    @staticmethod
    def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
        host = t.data.to(HOST).contiguous()
        if pin:
            try:
                host = host.pin_memory()
            except RuntimeError as e:  # pinned memory is a limited resource on some systems
                logger.warning("block swap: could not pin host memory (%s); copies will be slower", e)
        return host

    # ---- copies ------------------------------------------------------------------------------------
    def _copy(self, block: _SwappedBlock, stream: Any) -> tuple[list[torch.Tensor], Any]:
        # copies made under inference mode must still be usable by a later training step
        with torch.inference_mode(False), torch.no_grad():
            if stream is None:
                return [h.to(self.device, non_blocking=True, copy=True) for h in block.hosts], None
            with torch.cuda.stream(stream):
                copies = [h.to(self.device, non_blocking=True, copy=True) for h in block.hosts]
            return copies, stream.record_event()

    def _prefetch(self, index: int) -> None:
        block = self.blocks.get(index)
        if block is None or block.copies is not None or index in self._pending:
            return
        self._pending[index] = self._copy(block, self._stream)
        self.stats["prefetches"] += 1

    def _before_block(self, block: _SwappedBlock, module: nn.Module, args: Any) -> None:
        self._release_held()
        pending = self._pending.pop(block.index, None)
        if pending is None:
            copies, _ = self._copy(block, None)
            self.stats["fetches"] += 1
        else:
            copies, event = pending
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for c in copies:  # the allocator must not reuse them while this stream still reads them
                    c.record_stream(current)
        for t, c, host in zip(block.tensors, copies, block.hosts, strict=True):
            t.data = c
            if c.numel():
                self._live[(str(c.device), c.untyped_storage().data_ptr())] = host
        block.copies = copies
        # recomputation in backward (checkpointing) walks the blocks in reverse
        self._prefetch(block.index + (-1 if _in_backward() else 1))

    def _after_block(self, block: _SwappedBlock, module: nn.Module, args: Any, output: Any) -> None:
        if _in_backward():
            # a checkpointed block recomputed in backward: autograd holds its weights by reference for the
            # block's backward (and checkpointing checks their device), so the copy stays until the
            # previous block is recomputed, i.e. until this block's backward is over
            self._held.append(block)
            return
        self._release(block)

    def _release_held(self) -> None:
        for held in self._held:
            self._release(held)
        self._held = []

    def _release(self, block: _SwappedBlock) -> None:
        for c in block.copies or ():
            if c.numel():
                self._live.pop((str(c.device), c.untyped_storage().data_ptr()), None)
        for t, host in zip(block.tensors, block.hosts, strict=True):
            t.data = host
        block.copies = None

    # ---- tensors autograd saves for backward -------------------------------------------------------
    def _enter_model(self, module: nn.Module, args: Any) -> None:
        self._release_held()  # the last block recomputed by the previous backward
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        hooks.__enter__()
        self._contexts.append(hooks)
        self._prefetch(min(self.blocks, default=-1))

    def _exit_model(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._contexts:
            self._contexts.pop().__exit__(None, None, None)

    def _pack(self, tensor: torch.Tensor) -> Any:
        # anything else is kept as autograd would keep it; detached, because an op's saved output that
        # held on to its own grad_fn would form a reference cycle only the garbage collector frees
        if self._live:
            try:
                host = self._live.get((str(tensor.device), tensor.untyped_storage().data_ptr()))
            except (RuntimeError, NotImplementedError):  # tensors without a plain storage
                host = None
            if host is not None:
                return _HostRef(host, tensor)
        return tensor.detach()

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _HostRef):
            return packed
        self.stats["backward_fetches"] += 1
        copy = packed.host.to(self.device, non_blocking=True, copy=True)
        return copy.as_strided(packed.size, packed.stride, packed.offset)


def enable_block_swap(model: nn.Module, device: torch.device | str, blocks_on_device: int) -> BlockSwap:
    """Keep the frozen weights of ``model``'s repeated blocks, except the last ``blocks_on_device`` blocks, in
    CPU memory (pinned when CUDA), and copy each block to ``device`` just for its forward.

    While block ``i`` computes, block ``i + 1`` is copied on a side CUDA stream (on the CPU the same steps run
    synchronously). Weights autograd saves for backward are held as host references and copied again when
    backward needs them, so training works with or without gradient checkpointing (with checkpointing, the
    recomputed forward fetches the block again). Trainable parameters (a LoRA) and all modules outside the
    blocks move to ``device`` and stay there. Full fine-tuning is refused: its block weights all train.

    The model must not be moved with ``.to()`` afterwards, and its blocks must run through its forward (whose
    hooks route what autograd saves).
    """
    return BlockSwap(model, device, blocks_on_device)
