"""``torch.compile`` of a model's repeated blocks (state dict keys unchanged), and CUDA graphs.

With a CUDA-graph mode (``mode="reduce-overhead"``) each block's kernels are replayed as one CUDA graph, and
whoever runs the model calls :func:`begin_step` at the start of each step. Apply it last, after the LoRA,
fp8 storage and block swap.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import DiffusmithError
from .blocks import repeated_blocks, tensors_of

__all__ = ["COMPILE_MODES", "CUDA_GRAPH_MODES", "begin_step", "check_compile_mode", "compile_repeated_blocks",
           "uses_cuda_graphs"]

logger = logging.getLogger(__name__)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """torch.compile's own exception types that this torch has (InductorError is newer than torch 2.4)."""
    errors: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from torch._dynamo.exc import TorchDynamoException

        errors.append(TorchDynamoException)
    with contextlib.suppress(ImportError):
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
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
    devices = {t.device.type for t in tensors_of(model)}
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
