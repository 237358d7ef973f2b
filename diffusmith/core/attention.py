"""Scaled dot-product attention as one small pure function.

Layout used everywhere in diffusmith: ``q, k, v`` are ``(B, H, L, D)`` (batch, heads, tokens, head dim), the
layout of ``torch.nn.functional.scaled_dot_product_attention``. Models reshape into it; this module owns the
kernel choice so a faster kernel can be swapped in at one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention over keys, no dropout, not causal.

    Args:
        q: queries ``(B, H, L_q, D)``.
        k, v: keys and values ``(B, H, L_k, D)``.
        mask: optional boolean key mask ``(B, L_k)``; True = the key may be attended to. Every query row must
            keep at least one key (a row with no key gives NaN, as in SDPA).

    Returns:
        ``(B, H, L_q, D)`` in the dtype of ``q``.
    """
    attn_mask = None
    if mask is not None:
        attn_mask = mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, L_k)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
