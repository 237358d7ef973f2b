"""Gradient checkpointing for one repeated block, switched by flags the model's forward receives.

Checkpointing keeps only a block's inputs during the forward pass and recomputes the block's activations
during backward, which trades compute for memory. The offload variant also moves what checkpointing still
keeps (the block's tensor inputs) to CPU memory until backward needs them.

In both modes the last block is not checkpointed: its recomputation would come first in backward, at the
memory peak, and save nothing (see :func:`checkpoints_block`). An interval ``N`` > 1 checkpoints only every
``N``-th block (SimpleTuner's ``--gradient_checkpointing_interval``): the others keep their activations, a
middle ground in memory and time for a GPU that has some room. Two modes say how much of a block is
recomputed:

- ``"full"``: the whole block (the default). A LoRA step's frozen weights need no weight gradient, so its
  backward costs about one forward and the recomputation adds about half of the step's time.
- ``"selective"``: the outputs of attention and of the matrix products that do not widen their input are
  kept (q/k/v and output projections, the MLP's down-projection); the elementwise work (norms, modulation,
  rotary embedding, GELU, casts, gates) and the products that widen their input 4x or more (the MLP's
  up-projection, whose 4x-wide output is a block's largest activation, and a LoRA's up-projection, which
  costs rank/width of its layer) run again in backward. Measured on the mid-size benchmark model (two
  CPUs, alternated with no checkpointing): about half the activations of no checkpointing at 1.1x-1.2x its
  time, where ``"full"`` gives 0.3x at 1.2x-1.25x at the model's 4 blocks (a deep model's whole-block step
  approaches 1.5x; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ..errors import DiffusmithError

CHECKPOINTING_MODES = ("full", "selective")

_aten = torch.ops.aten


def _ops(*names: str) -> frozenset:
    return frozenset(getattr(_aten, name).default for name in names if hasattr(_aten, name))


# Every Linear lowers to one of these products; the second matrix is the last argument.
_PRODUCTS = _ops("mm", "bmm")
_PRODUCTS_WITH_BIAS = _ops("addmm", "baddbmm")
# The fused attention kernels of each device.
_ATTENTION = _ops(
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)


def is_widening_product(mat2: torch.Tensor) -> bool:
    """A product ``(M, K) @ (K, N)`` with ``N >= 4 K``: an MLP's up-projection or a LoRA's B. Its output is
    at least 4x the size of its input, which is kept anyway; recomputing it is cheap for a LoRA (``K`` = the
    rank) and a third of a transformer block's products for the MLP."""
    inner, width = mat2.shape[-2], mat2.shape[-1]
    return width >= 4 * inner


def save_expensive_ops_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective-checkpoint policy: keep the outputs of attention and of the matrix products, except the
    widening ones; recompute everything else (norms, modulation, rotary, GELU, casts, sums)."""
    if op in _ATTENTION:
        return CheckpointPolicy.MUST_SAVE
    if op in _PRODUCTS or op in _PRODUCTS_WITH_BIAS:
        mat2 = args[2] if op in _PRODUCTS_WITH_BIAS else args[1]
        return CheckpointPolicy.PREFER_RECOMPUTE if is_widening_product(mat2) else CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def check_checkpointing_interval(interval: object, name: str = "gradient_checkpointing_interval") -> int:
    """``interval`` if it is a positive int, else a one-line error naming it ``name`` (the CLI passes its flag)."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise DiffusmithError(f"{name} must be a positive integer, got {interval!r}")
    return interval


def checkpoints_block(index: int, num_blocks: int, interval: int = 1) -> bool:
    """Whether a model checkpoints its repeated block ``index`` (of ``num_blocks``) when checkpointing is on:
    every ``interval``-th block (0, N, 2N, ...; all of them for 1) but the last, in both modes. The last
    block's recomputation would be the first thing backward does, at the memory peak, where it needs as much
    memory as keeping the block's activations does: checkpointing it would cost its recomputation time and
    save no memory (tested: the same peak, up to the head's backward transients)."""
    return index < num_blocks - 1 and index % interval == 0


def check_checkpointing_mode(mode: str) -> str:
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"gradient_checkpointing_mode must be one of {', '.join(CHECKPOINTING_MODES)}, got {mode!r}")
    return mode


def gradient_checkpoint_forward(
    module: nn.Module,
    use_gradient_checkpointing: bool,
    use_gradient_checkpointing_offload: bool,
    *args: Any,
    gradient_checkpointing_mode: str = "full",
    **kwargs: Any,
) -> Any:
    """Call ``module(*args, **kwargs)``, checkpointed when asked and when autograd is recording.

    ``use_gradient_checkpointing_offload`` implies checkpointing: the saved block inputs go to CPU memory
    (pinned when CUDA is available) and come back for the recomputation in backward; under ``"selective"``
    the kept matmul/attention outputs stay where they are. ``gradient_checkpointing_mode`` is ``"full"``
    (recompute the whole block) or ``"selective"`` (see the module docstring). With both flags off, or under
    ``torch.no_grad()`` / ``torch.inference_mode()``, this is a plain call.
    """
    check_checkpointing_mode(gradient_checkpointing_mode)
    if not (use_gradient_checkpointing or use_gradient_checkpointing_offload) or not torch.is_grad_enabled():
        return module(*args, **kwargs)

    # torch's non-reentrant checkpoint saves its positional tensor inputs through the saved-tensor hooks
    # (so save_on_cpu sees them) but only holds keyword tensors by reference, which would keep them on the
    # GPU. Passing everything positionally makes the offload apply to keyword inputs too.
    names = list(kwargs)
    num_args = len(args)

    def call(*flat: Any) -> Any:
        return module(*flat[:num_args], **dict(zip(names, flat[num_args:], strict=True)))

    flat_inputs = (*args, *(kwargs[name] for name in names))
    options: dict[str, Any] = {"use_reentrant": False}
    if gradient_checkpointing_mode == "selective":
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, save_expensive_ops_policy)
    if use_gradient_checkpointing_offload:
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return torch.utils.checkpoint.checkpoint(call, *flat_inputs, **options)
    return torch.utils.checkpoint.checkpoint(call, *flat_inputs, **options)
