"""Scaled dot-product attention as one small pure function, and the choice of its kernel.

Layout used everywhere in diffusmith: ``q, k, v`` are ``(B, H, L, D)`` (batch, heads, tokens, head dim), the
layout of ``torch.nn.functional.scaled_dot_product_attention``. Models reshape into it; this module owns the
kernel choice (:func:`set_attention_backend`, the ``--attention-backend`` flag) so a faster kernel can be
swapped in at one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusmith.errors import DiffusmithError

# torch's SDPA kernels by the names users pick them with; "auto" leaves the choice to torch
_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
ATTENTION_BACKENDS = ("auto", *_KERNELS)
_FALLBACK_ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                   SDPBackend.MATH)

_backend = "auto"
_kernels: list[SDPBackend] | None = None  # the kernels sdpa_kernel allows, in priority order; None = torch's


def check_attention_backend(name: object) -> str:
    """``name`` if it is an attention backend (an ``--attention-backend`` value), else a one-line error."""
    if name not in ATTENTION_BACKENDS:
        raise DiffusmithError(f"unknown --attention-backend {name!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    return name


def set_attention_backend(name: str) -> None:
    """Pick the attention kernel for every model of this process.

    ``"auto"`` (the default) is torch's own choice. ``"cudnn"``, ``"flash"`` and ``"efficient"`` put that CUDA
    kernel first; inputs it cannot take (a mask for flash, an unsupported GPU or dtype) fall back to the others
    in torch's order, so a preference never fails a run. On a CPU torch runs its own fused kernel whatever the
    preference. ``"math"`` is the plain-products reference (slow, most memory; on every device).
    """
    global _backend, _kernels
    check_attention_backend(name)
    if name == "auto":
        _kernels = None
    elif name == "math":
        _kernels = [SDPBackend.MATH]
    else:
        _kernels = [_KERNELS[name], *(k for k in _FALLBACK_ORDER if k is not _KERNELS[name])]
    _backend = name


def attention_backend() -> str:
    """The name :func:`set_attention_backend` was last given (``"auto"`` if never)."""
    return _backend


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
    if _kernels is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    with sdpa_kernel(_kernels, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
