"""Small building blocks that diffusion transformers of several families share.

Pure functions first (normalisation, timestep sinusoids, rotary embeddings, AdaLN modulation), then the few
modules that hold weights. Module attribute names follow the diffusers key layout (``weight``,
``net.0.proj`` / ``net.2``, ``linear_1`` / ``linear_2``, ``linear``) so that official checkpoints load as is.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

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
    return _scale_rms_normed(x32 * _inv_rms(x32, eps), weight, x.dtype)


def _inv_rms(x32: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)


def _scale_rms_normed(normed: torch.Tensor, weight: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if weight is None:
        return normed.to(dtype)
    if weight.dtype in _HALF_DTYPES:
        return normed.to(weight.dtype) * weight
    return (normed * weight).to(dtype)


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
# Norms that keep only their inputs for backward
# ----------------------------------------------------------------------------------------------------------
# A norm's float32 intermediates (rms_norm's copy of x, a LayerNorm output that the modulation product keeps)
# are as large as the activations around them. These autograd Functions keep the inputs instead (and the RMS
# norm its inverse RMS, one float per row, so that backward does not reduce over x again) and derive the
# gradients by hand from the recomputed normalised values: the same ops, in the same order and dtypes, that
# autograd runs for the plain call, so values and gradients are bitwise those of the plain call (tested),
# without a second autograd graph per norm.


def _keeps_inputs(*inputs: torch.Tensor | None) -> bool:
    """Whether the keep-the-inputs Functions apply: a gradient is recorded, and torch.compile is not tracing
    (its partitioner chooses what to recompute)."""
    return (not torch.compiler.is_compiling() and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in inputs))


class _RMSNormKeepingInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        x32 = x.float()
        inv_rms = _inv_rms(x32, eps)  # one float per row: kept, not recomputed in backward
        ctx.save_for_backward(x, weight, inv_rms)
        return _scale_rms_normed(x32 * inv_rms, weight, x.dtype)  # rms_norm's ops

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, inv_rms = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        x32 = x.float()
        normed = x32 * inv_rms if need_weight else None  # only the weight's gradient reads it
        grad_weight = None
        if weight is None:
            grad_normed = grad.float()
        elif weight.dtype in _HALF_DTYPES:  # y = normed.to(w.dtype) * w
            grad_normed = (grad * weight).float()
            if need_weight:
                grad_weight = (grad * normed.to(weight.dtype)).sum_to_size(weight.shape)
        else:  # y = (normed * w).to(x.dtype)
            grad32 = grad.float()
            grad_normed = grad32 * weight
            if need_weight:
                grad_weight = (grad32 * normed).sum_to_size(weight.shape)
        grad_x = None
        if need_x:
            # normed = x32 * inv_rms, inv_rms = rsqrt(mean(x32 ** 2) + eps): autograd's two paths to x32. Its
            # pow's gradient is grad_mean * (2 * x32); the factor 2 goes on the per-row grad_mean instead (exact
            # either way), which saves a product over all of x
            grad_inv_rms = (grad_normed * x32).sum(-1, keepdim=True)
            grad_mean = -0.5 * grad_inv_rms * inv_rms.pow(3) / x.shape[-1]
            grad_x = (grad_normed * inv_rms + (2.0 * grad_mean) * x32).to(x.dtype)
        return grad_x, grad_weight, None


def rms_norm_keeping_input(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """:func:`rms_norm` that keeps only ``x`` and ``weight`` for backward (not its float32 copy of ``x``)."""
    if not _keeps_inputs(x, weight):
        return rms_norm(x, weight, eps)
    return _RMSNormKeepingInput.apply(x, weight, eps)


class _NormModulateKeepingInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        normed = F.layer_norm(x, x.shape[-1:], eps=eps)  # float32 under CUDA autocast, x's dtype otherwise
        ctx.eps, ctx.norm_dtype = eps, normed.dtype
        ctx.save_for_backward(x, shift, scale)
        return modulate(normed, shift, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, shift, scale = ctx.saved_tensors
        need_x, need_shift, need_scale = ctx.needs_input_grad[:3]
        x_norm = x.to(ctx.norm_dtype)
        normed, mean, rstd = torch.native_layer_norm(x_norm, x.shape[-1:], None, None, ctx.eps)
        factor = 1 + scale[:, None, :]  # (B, 1, D)
        # out = normed * factor + shift[:, None]: as autograd, each gradient is reduced over the broadcast
        # tokens in the product's dtype, then cast to its input's dtype
        grad_product = grad.to(torch.promote_types(ctx.norm_dtype, factor.dtype))
        grad_shift = grad.sum(1, keepdim=True).to(shift.dtype).squeeze(1) if need_shift else None
        grad_scale = None
        if need_scale:
            grad_scale = (grad_product * normed).sum(1, keepdim=True).to(factor.dtype).squeeze(1)
        grad_x = None
        if need_x:
            grad_normed = (grad_product * factor).to(ctx.norm_dtype)
            grad_x = torch.ops.aten.native_layer_norm_backward(
                grad_normed, x_norm, x.shape[-1:], mean, rstd, None, None, [True, False, False])[0].to(x.dtype)
        return grad_x, grad_shift, grad_scale, None


def norm_modulate_keeping_input(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`norm_modulate` that keeps only its inputs for backward (not the norm's output, which the product
    with ``scale`` would keep)."""
    if not _keeps_inputs(x, shift, scale):
        return norm_modulate(x, shift, scale, eps)
    return _NormModulateKeepingInput.apply(x, shift, scale, eps)


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
        return rms_norm_keeping_input(x, self.weight, self.eps)


class GeluProjection(nn.Module):
    """Linear projection followed by tanh-approximated GELU (key ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fuses_linear_gelu(self.proj, x):
            return torch.ops.mkldnn._linear_pointwise(x, self.proj.weight, self.proj.bias, "gelu", [], "tanh")
        return F.gelu(self.proj(x), approximate="tanh")


def _fuses_linear_gelu(proj: nn.Module, x: torch.Tensor) -> bool:
    """Whether oneDNN can run ``proj`` and the GELU as one kernel: a plain CPU ``nn.Linear`` in ``x``'s dtype
    (float32, or bfloat16 where oneDNN supports it) outside autograd, autocast, torch.compile and dispatch modes
    (a FLOP counter must see the product). The GELU then reads the product in float32 instead of its rounding
    to ``x``'s dtype: within one rounding of the unfused result. On an AVX-512 CPU a 1024 x 768 -> 3072 bf16 call
    takes 3.0 ms instead of the unfused pair's 4.6 ms (torch's tanh GELU is slow there: ``benchmarks/RESULTS.md``)."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():  # first: dynamo must not trace the rest
        return False
    if x.device.type != "cpu" or type(proj) is not nn.Linear:
        return False
    if x.dtype not in _onednn_linear_dtypes() or proj.weight.dtype != x.dtype or proj.weight.device.type != "cpu":
        return False
    if proj.bias is not None and proj.bias.dtype != x.dtype:
        return False
    if proj._forward_pre_hooks or proj._forward_hooks or torch.is_autocast_enabled("cpu"):
        return False
    return not (_get_current_dispatch_mode_stack() or torch._C._is_torch_function_mode_enabled())


@functools.cache
def _onednn_linear_dtypes() -> tuple[torch.dtype, ...]:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return ()
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


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
