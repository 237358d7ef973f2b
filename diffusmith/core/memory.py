"""Training memory modes and compilation, applied from outside to a model's repeated blocks.

A model declares which of its ModuleLists repeats by name (``repeated_blocks = "transformer_blocks"``);
everything here works from that declaration and knows nothing of model families. One module each:

- :mod:`.block_swap` (:func:`enable_block_swap`): the frozen weights of all blocks but the last few wait in
  (pinned) CPU memory and are copied to the device just before their block runs.
- :mod:`.fp8` (:func:`enable_fp8_storage`): the frozen Linear weights inside the blocks are stored in float8
  with one scale per output row, and upcast one layer at a time when it runs.
- :mod:`.compilation` (:func:`compile_repeated_blocks`): ``torch.compile`` on each block's forward, optionally
  replayed as CUDA graphs (then whoever runs the model calls :func:`begin_step` at the start of each step).

Apply them after the LoRA is injected and in this order: fp8 storage, block swap, compile.
"""

from __future__ import annotations

from .block_swap import BlockSwap, check_block_count, enable_block_swap
from .blocks import repeated_blocks
from .compilation import (
    COMPILE_MODES,
    CUDA_GRAPH_MODES,
    begin_step,
    check_compile_mode,
    compile_repeated_blocks,
    uses_cuda_graphs,
)
from .fp8 import Fp8Linear, enable_fp8_storage

__all__ = [
    "COMPILE_MODES",
    "CUDA_GRAPH_MODES",
    "BlockSwap",
    "Fp8Linear",
    "begin_step",
    "check_block_count",
    "check_compile_mode",
    "compile_repeated_blocks",
    "enable_block_swap",
    "enable_fp8_storage",
    "repeated_blocks",
    "uses_cuda_graphs",
]
