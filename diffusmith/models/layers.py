"""Small building blocks that diffusion transformers of several families share.

Pure functions first (normalisation, timestep sinusoids, rotary embeddings, AdaLN modulation), then the few
modules that hold weights. Module attribute names follow the diffusers key layout (``weight``,
``net.0.proj`` / ``net.2``, ``linear_1`` / ``linear_2``, ``linear``) so that official checkpoints load as is.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_HALF_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMS-normalise the last dimension in float32, then scale by ``weight``.

    With a half-precision weight the normalised value is rounded to the weight's dtype before the product
    (the reference's order, so bf16 results match it); otherwise the product is taken in float32 and the
    result returned in ``x``'s dtype.
    """
    x32 = x.float()  # one fp32 copy: autograd keeps it once, not twice
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return normed.to(x.dtype)
    if weight.dtype in _HALF_DTYPES:
        return normed.to(weight.dtype) * weight
    return (normed * weight).to(x.dtype)


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    *,
    max_period: float = 10000.0,
    freq_shift: float = 1.0,
    scale: float = 1.0,
    flip_sin_to_cos: bool = False,
) -> torch.Tensor:
    """Sinusoidal embedding of the values ``t`` ``(N,)``: returns ``(N, dim)`` float32.

    Frequency ``i`` is ``max_period ** (-i / (dim // 2 - freq_shift))``; the angles ``scale * t * freq`` are
    taken in float32 whatever ``t``'s dtype. The halves are ``[sin, cos]``, or ``[cos, sin]`` with
    ``flip_sin_to_cos``; an odd ``dim`` gets a zero last column.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    angles = scale * (t[:, None].float() * freqs[None, :])  # (N, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (N, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def rope_inverse_frequencies(dim: int, theta: float) -> torch.Tensor:
    """``theta ** (-2i / dim)`` for ``i < dim / 2``: the rotation speed of each channel pair, float32."""
    if dim % 2:
        raise ValueError(f"rotary embedding axis size must be even, got {dim}")
    return 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def rope_angles(positions: torch.Tensor, axes_dims: Sequence[int], theta: float) -> torch.Tensor:
    """Rotation angles for multi-axis RoPE.

    Args:
        positions: ``(L, n_axes)`` integer or float positions, one column per axis.
        axes_dims: channels given to each axis (each even; they sum to the head dim).
        theta: RoPE base.

    Returns:
        ``(L, sum(axes_dims) // 2)`` float32 angles, axis blocks side by side in ``axes_dims`` order.
    """
    blocks = []
    for axis, dim in enumerate(axes_dims):
        inv_freq = rope_inverse_frequencies(dim, theta).to(positions.device)
        blocks.append(positions[:, axis].float()[:, None] * inv_freq[None, :])  # (L, dim / 2)
    return torch.cat(blocks, dim=-1)


def rope_freqs_cis(angles: torch.Tensor) -> torch.Tensor:
    """Unit complex numbers ``exp(i * angles)`` (complex64): the rotation table :func:`apply_rope` takes."""
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs ``(x[2i], x[2i+1])`` of the last dimension by the complex table.

    ``freqs_cis`` (from :func:`rope_freqs_cis`) has last dimension ``x.shape[-1] // 2`` and broadcasts against
    ``x`` without it (e.g. ``x`` ``(B, L, H, D)`` with a table ``(L, 1, D/2)``). The rotation runs in float32
    (one complex product, as the reference does) and the result has ``x``'s dtype.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (..., D/2) complex
    return torch.view_as_real(pairs * freqs_cis).flatten(-2).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation of tokens ``x`` ``(B, L, D)`` by per-sample ``shift`` and ``scale`` ``(B, D)``."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine over the last dimension, then AdaLN :func:`modulate`."""
    return modulate(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale)


# ----------------------------------------------------------------------------------------------------------
# Recomputation of cheap functions in backward
# ----------------------------------------------------------------------------------------------------------


class _RecomputedInBackward(torch.autograd.Function):
    """``fn(*inputs)`` that keeps only its inputs for backward; there ``fn`` runs again (under the forward's
    autocast state) and autograd differentiates that rerun, so the gradients are those of ``fn`` itself."""

    @staticmethod
    def forward(ctx, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        ctx.fn = fn
        ctx.device_type = next(t.device.type for t in inputs if isinstance(t, torch.Tensor))
        ctx.autocast = (torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type))
        ctx.save_for_backward(*inputs)
        return fn(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        needs = ctx.needs_input_grad[1:]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs, strict=True)]
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
            out = ctx.fn(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None, *(next(grads) if need else None for need in needs))


def recompute_in_backward(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """``fn(*inputs)`` for a cheap elementwise ``fn`` whose intermediates are large (a float32 copy, a norm's
    output that a product keeps): only the tensor ``inputs`` are kept for backward, where ``fn`` runs again.
    Same values and gradients as calling ``fn``; a plain call when no gradient is recorded, and while
    torch.compile traces (its partitioner chooses what to recompute, and the rerun in backward would break
    the graph)."""
    if (torch.compiler.is_compiling() or not torch.is_grad_enabled()
            or not any(t.requires_grad for t in inputs)):
        return fn(*inputs)
    return _RecomputedInBackward.apply(fn, *inputs)


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned scale (key ``weight``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # rms_norm's float32 copy of x would be kept for backward: keep x instead, recompute the rest
        return recompute_in_backward(functools.partial(rms_norm, eps=self.eps), x, self.weight)


class GeluProjection(nn.Module):
    """Linear projection followed by tanh-approximated GELU (key ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Transformer MLP ``Linear -> tanh-GELU -> Linear`` with keys ``net.0.proj`` and ``net.2``.

    ``net.1`` is a parameter-free placeholder where the reference has a (zero) dropout, so that the
    checkpoint indices line up.
    """

    def __init__(self, dim: int, hidden_dim: int, dim_out: int | None = None):
        super().__init__()
        self.net = nn.ModuleList(
            [GeluProjection(dim, hidden_dim), nn.Identity(), nn.Linear(hidden_dim, dim_out or dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TimestepMLP(nn.Module):
    """``Linear -> SiLU -> Linear`` over a timestep sinusoid (keys ``linear_1``, ``linear_2``)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class AdaLayerNormOut(nn.Module):
    """Final AdaLN: LayerNorm without affine, then scale and shift predicted from the conditioning.

    The projection (key ``linear``) outputs ``[scale, shift]`` in that order.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(cond_dim, 2 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(cond).to(x.dtype)).chunk(2, dim=-1)  # (B, D) each
        return modulate(F.layer_norm(x, x.shape[-1:], eps=self.eps), shift, scale)
