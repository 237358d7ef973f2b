"""Matrix-product FLOPs of a benchmark step, counted by torch on the meta device.

The step runs once on shape-only (meta) tensors under ``torch.utils.flop_counter.FlopCounterMode``, which adds
up every matrix product (``mm``, ``addmm``, ``bmm``, the fused attention kernels) with its shapes: the count is
what this code runs, LoRA, skipped work and recomputation included, with no GPU and no arithmetic.

- **Model FLOPs** (for MFU): the step as the model needs it, counted without checkpointing and with attention as
  its plain products (``fused_attention=False``: QK^T and PV forward, their four gradient products backward, no
  recomputation anywhere). A LoRA step computes no weight gradients for the frozen weights, so this is about
  2.2 forwards, not the 3 forwards (6 x parameters x tokens) of full training.
- **Hardware FLOPs** (for HFU): the step as configured (checkpointing, batched CFG), with attention as the fused
  kernel the GPU runs (``fused_attention=True``; its backward recomputes the scores, as torch's formula counts).

A model of ``L`` blocks is counted at 3 and 4 blocks and extrapolated (:func:`extrapolate`): every block but the
first and the last is the same work, so the count is linear in ``L`` from there, and exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def _fused_attention(q, k, v, attn_mask=None):
    """``F.scaled_dot_product_attention`` (as diffusmith calls it: a mask, no other option) as the fused
    memory-efficient kernel, whatever the device: on meta tensors torch would otherwise take its plain-products
    path, whose backward differs from a GPU's kernel."""
    bias = None
    if attn_mask is not None:  # a boolean key mask as the additive bias the kernel takes
        bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[0]


def _inplace_addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """``addmm_``: the product's FLOPs, as torch counts ``addmm`` (whose table lacks the in-place form that the
    LoRA layer's backward runs)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def count_flops(step: Callable[[], object], *, fused_attention: bool) -> int:
    """Matrix-product FLOPs of one call of ``step`` (forward and, if it calls it, backward)."""
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _inplace_addmm_flops})
    # patched for the call, the recomputation of checkpointed blocks in backward included (which a torch
    # function mode would not see)
    sdpa = mock.patch.object(F, "scaled_dot_product_attention", _fused_attention) if fused_attention else None
    with counter, sdpa or contextlib.nullcontext():
        step()
    return counter.get_total_flops()


def extrapolate(count: Callable[[int], int], num_layers: int) -> int:
    """``count(num_layers)`` from ``count(3)`` and ``count(4)`` (direct below 5 blocks). The blocks in between
    each add the same FLOPs; the first (whose inputs need no gradient: with some LoRA targets its input
    gradients are not computed) and the last (whose text result is dropped, and which is never checkpointed)
    may not."""
    if num_layers < 5:
        return count(num_layers)
    three, four = count(3), count(4)
    return three + (num_layers - 3) * (four - three)


def dit_forward_flops(cfg, image_tokens: int, text_tokens: int, batch: int = 1) -> float:
    """The reference architecture's matrix-product FLOPs for one Qwen-Image DiT forward, by formula: for each
    stream 2 x (weights of its Linears) x (its tokens), plus 4 x L^2 x D per block for attention (L = text +
    image tokens, D = width). It counts the last block's text stream after attention, which diffusmith skips
    (its result is dropped), and no LoRA; the counted figures are the ones the MFU uses."""
    d, mlp, joint = cfg.inner_dim, cfg.mlp_ratio * cfg.inner_dim, cfg.joint_attention_dim
    tokens = image_tokens + text_tokens
    stream_linears = 4 * d * d + 2 * d * mlp  # q, k, v, out + MLP in/out: per stream, per token
    per_block = (2 * stream_linears * tokens  # both streams: image tokens through one, text through the other
                 + 2 * 2 * d * 6 * d  # AdaLN modulation of both streams, once per sample
                 + 4 * tokens * tokens * d)  # attention: Q K^T and P V
    outside = (2 * image_tokens * cfg.in_channels * d  # img_in
               + 2 * text_tokens * joint * d  # txt_in
               + 2 * image_tokens * d * cfg.patch_size ** 2 * cfg.out_channels  # proj_out
               + 2 * d * 2 * d  # norm_out modulation
               + 2 * (cfg.timestep_embedding_dim * d + d * d))  # timestep MLP
    return float(batch * (cfg.num_layers * per_block + outside))
