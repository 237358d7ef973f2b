"""Training memory modes, applied from outside to a model's repeated blocks.

A model declares which of its ModuleLists repeats by name (``repeated_blocks = "transformer_blocks"``);
everything here works from that declaration and knows nothing of model families.

- :func:`enable_block_swap`: the frozen weights of all blocks but the last few wait in (pinned) CPU memory;
  each block's weights are copied to the device just before it runs (the next block's copy is prefetched
  on a side CUDA stream meanwhile) and dropped after. Weights that autograd saves for backward are not
  kept on the device either: they are re-copied when backward needs them. Trainable weights (a LoRA)
  and everything outside the blocks stay on the device.
- :func:`enable_fp8_storage`: the frozen Linear weights inside the blocks are stored in float8 with one
  scale per output row, and upcast one layer at a time when it runs.
- :func:`compile_repeated_blocks`: ``torch.compile`` on each block's forward (state dict keys unchanged);
  with a CUDA-graph mode (``mode="reduce-overhead"``) each block's kernels are replayed as one CUDA graph,
  and whoever runs the model calls :func:`begin_step` at the start of each step.

Apply them after the LoRA is injected and in this order: fp8 storage, block swap, compile. The host copy
of a swapped weight is the truth: nothing is ever copied back from the device.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiffusmithError

__all__ = [
    "COMPILE_MODES",
    "CUDA_GRAPH_MODES",
    "BlockSwap",
    "Fp8Linear",
    "begin_step",
    "check_compile_mode",
    "compile_repeated_blocks",
    "enable_block_swap",
    "enable_fp8_storage",
    "repeated_blocks",
    "uses_cuda_graphs",
]

logger = logging.getLogger(__name__)
HOST = torch.device("cpu")


def repeated_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList a model declares by name in its ``repeated_blocks`` attribute."""
    name = getattr(model, "repeated_blocks", None)
    blocks = getattr(model, name, None) if isinstance(name, str) else None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise DiffusmithError(f"{type(model).__name__} declares no repeated blocks (a 'repeated_blocks' attribute "
                              "naming a non-empty ModuleList); block swap, fp8 storage and --compile need one")
    return blocks


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _gib(tensors: Iterable[torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


# ----------------------------------------------------------------------------------------------------------
# Block swap
# ----------------------------------------------------------------------------------------------------------


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
            frozen = [t for t in _tensors(blocks[i]) if not t.requires_grad and id(t) not in swapped_ids]
            swapped_ids.update(id(t) for t in frozen)
            hosts = [self._host_copy(t, pin) for t in frozen]
            for t, host in zip(frozen, hosts, strict=True):
                t.data = host
            self.blocks[i] = _SwappedBlock(i, frozen, hosts)
        with torch.no_grad():
            for t in _tensors(model):  # everything else: on the device, for good
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
                    "pinned " if pin else "", _gib(self.swapped_tensors), len(blocks) - len(swapped), self.device)

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


# ----------------------------------------------------------------------------------------------------------
# fp8 storage of frozen Linear weights
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------------------


def _compile_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import TorchDynamoException

        errors.append(TorchDynamoException)
    except ImportError:
        pass
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)


# Graphs each block's code may keep: block variants (the first block's inputs need no gradient, the last
# skips its text stream) x static and dynamic sizes x contexts (training, checkpoint recomputation,
# validation under no_grad). Torch's default of 8 is hit within the first steps of a checkpointed run; past
# it torch runs the code eagerly, and a checkpointed block whose forward ran compiled but whose
# recomputation runs eagerly saves other tensors (CheckpointError, seen in the test suite). (torch also
# reports that error when a recomputation picks another of several fitting graphs, pytorch/pytorch#166926,
# with a fixed lookup order as its remedy; not seen here, so not applied.)
RECOMPILE_LIMIT = 64


def _allow_recompiles() -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name, RECOMPILE_LIMIT) < RECOMPILE_LIMIT:
        setattr(config, name, RECOMPILE_LIMIT)


def _reporting(compiled: Callable, name: str, errors: tuple[type[BaseException], ...]) -> Callable:
    @functools.wraps(compiled)
    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except errors as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DiffusmithError(f"torch.compile failed on {name} ({first}); leave out --compile") from e

    return forward


# torch.compile's modes (``--compile-mode``); the ones that also capture CUDA graphs: a block's kernels are
# recorded once and then replayed with one launch, which removes the per-kernel launch cost of a step that is
# bound by it (a mid-size model, or any model whose kernels are short).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
_CUDA_GRAPHS_ATTR = "_diffusmith_cuda_graphs"


def check_compile_mode(mode: object) -> str:
    if mode not in COMPILE_MODES:
        raise DiffusmithError(f"unknown --compile-mode {mode!r}: use one of {', '.join(COMPILE_MODES)}")
    return mode


def uses_cuda_graphs(model: nn.Module) -> bool:
    """Whether ``model``'s blocks were compiled in a CUDA-graph mode."""
    return getattr(model, _CUDA_GRAPHS_ATTR, False)


def begin_step(model: nn.Module) -> None:
    """Tell torch a new step of ``model`` begins (a training micro-batch, a denoising step), where its blocks
    run as CUDA graphs: the graphs' output memory of the previous step is reused from here on. Without this
    torch would take each block's call for a new step (no block calls the next one inside a compiled region),
    and the block outputs the next block reads would be overwritten (pytorch/pytorch#152887). A step's inputs
    must not be graph outputs of the step before; the DiT's are not: its last layers run eagerly. Nothing
    otherwise."""
    if uses_cuda_graphs(model):
        torch.compiler.cudagraph_mark_step_begin()


def _check_cuda_graph_placement(model: nn.Module) -> None:
    """A CUDA graph replays fixed addresses: weights that move between calls (block swap, offload) would be
    recorded again at each call. On the CPU torch runs the compiled code without graphs."""
    devices = {t.device.type for t in _tensors(model)}
    if devices == {"cpu"}:
        logger.warning("CUDA graphs apply on CUDA devices only; on the CPU this is torch.compile's plain code")
    elif devices != {"cuda"}:
        raise DiffusmithError("CUDA graphs (--compile-mode reduce-overhead / max-autotune) need the whole model "
                              "on the GPU: drop --block-swap / --offload, or use --compile-mode default")
    elif torch.version.hip:
        logger.warning("CUDA graphs through torch.compile are not tested on ROCm here, and torch has had reports "
                       "of wrong training with them there (pytorch/pytorch#187715); compare the loss with "
                       "--compile-mode default")


def compile_repeated_blocks(model: nn.Module, mode: str | None = None, **compile_kwargs: Any) -> None:
    """``torch.compile`` the forward of each of ``model``'s repeated blocks (in place), in ``mode`` (one of
    ``COMPILE_MODES``; None = torch's default) with ``compile_kwargs`` passed to ``torch.compile`` (e.g.
    ``backend="eager"``). With a mode of ``CUDA_GRAPH_MODES`` the model's weights must all be on the GPU, and
    each step must start with :func:`begin_step` (the pipeline's denoising step and the training loss do).

    Only the forward method is compiled: the module tree, its state dict keys and any hooks (such as block
    swap's, which run eagerly around the compiled code) stay as they were. Compilation happens on each
    block's first call; a failure there raises a DiffusmithError naming the block. A second input size
    (caption length, bucket) compiles once more, a graph with dynamic sizes that serves all later ones.
    """
    if not callable(getattr(torch, "compile", None)):
        raise DiffusmithError(f"this torch ({torch.__version__}) has no torch.compile; leave out --compile")
    from torch import _dynamo

    if not _dynamo.is_dynamo_supported():
        raise DiffusmithError("torch.compile is not supported on this Python/platform; leave out --compile")
    blocks = repeated_blocks(model)
    if mode is not None:
        check_compile_mode(mode)
        compile_kwargs["mode"] = mode
    cuda_graphs = mode in CUDA_GRAPH_MODES
    if cuda_graphs:
        _check_cuda_graph_placement(model)
    errors = _compile_errors()
    _allow_recompiles()
    for i, block in enumerate(blocks):
        name = f"{model.repeated_blocks}.{i}"
        if "forward" in block.__dict__:
            raise DiffusmithError(f"{name} is already compiled (or has a replaced forward); compile once")
        try:
            compiled = torch.compile(block.forward, **compile_kwargs)
        except (*errors, TypeError, ValueError, RuntimeError) as e:
            raise DiffusmithError(f"torch.compile refused {name}: {e}; check the compile options or leave "
                                  "out --compile") from e
        block.forward = _reporting(compiled, name, errors)
    if cuda_graphs:
        setattr(model, _CUDA_GRAPHS_ATTR, True)
    logger.info("compiled the forward of %d blocks (%s)", len(blocks),
                ", ".join(f"{k}={v}" for k, v in compile_kwargs.items()) or "default options")
