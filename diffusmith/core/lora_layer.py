"""The layer a LoRA trains in: a frozen Linear plus a low-rank update, never merged.

``y = base(x) + scale * (x @ down.T) @ up.T`` with ``scale = alpha / rank``. The second product and the sum
are one in-place ``addmm_`` into the base output, with the scale as its ``alpha``, so a layer runs three
matrix products and nothing else: no pass over the output for the scale, none for the sum (peft's layer
makes both, and their backward, for every layer, and spends several module calls of Python on each), and no
copy of the base output into a new tensor (what an out-of-place ``addmm`` makes first).
On a GPU, where a mid-size step is bound by kernel launches, that is about a tenth of the step's kernels.
Under torch.compile the sums are a product and an add instead, which the compiler fuses into the next
elementwise kernel (:func:`_add_low_rank`).
In training, a plain Linear base and its LoRA run as one autograd Function, whose backward sums the two
gradients of ``x`` (through the frozen weight and through ``down``) inside one product instead of one more
pass over ``x``'s gradient.

The parameter names are peft's (``base_layer.weight``, ``lora_A.<adapter>.weight``,
``lora_B.<adapter>.weight``), so training checkpoints keep their keys, and the initial weights are peft's
for the same seed: ``down`` Kaiming-uniform, ``up`` zero, so the layer starts as the base (tested against
peft). The LoRA weights are float32 whatever the base's dtype: under autocast their products run in the
compute dtype; outside it, the low-rank path runs in float32 and is added in the base output's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

__all__ = ["LoraLinear"]


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta: shape-only FLOP counting)
        return False


class _FrozenLinearWithLora(torch.autograd.Function):
    """``x @ weight.T + bias + scale * (x @ down.T) @ up.T`` for a frozen ``weight`` and ``bias``, all in one dtype.

    Its backward adds the input gradients of the frozen product and of the down-projection inside one product
    (``addmm_`` into the first), where autograd would compute them apart and add them in one more pass over
    ``x``'s gradient. The products and what is kept for backward are those autograd runs and keeps."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                up: torch.Tensor, scale: float) -> torch.Tensor:
        base = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())  # (tokens, out)
        hidden = x @ down.t()  # (tokens, r)
        ctx.save_for_backward(x, weight, down, up, hidden)
        ctx.scale = scale
        return _add_low_rank(base, hidden, up, scale, owned=not _outputs_may_be_kept())  # base is ours

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, down, up, hidden = ctx.saved_tensors
        need_x, _, _, need_down, need_up = ctx.needs_input_grad[:5]
        grad_x = grad_down = grad_up = None
        if need_up:
            grad_up = grad.t() @ hidden
            if ctx.scale != 1.0:
                grad_up = grad_up * ctx.scale
        if need_x or need_down:
            grad_hidden = grad @ up  # (tokens, r)
            if ctx.scale != 1.0:
                grad_hidden = grad_hidden * ctx.scale
            if need_down:
                grad_down = grad_hidden.t() @ x
            if need_x:  # grad @ weight + grad_hidden @ down, summed as the forward sums (a fresh base: ours)
                grad_x = _add_low_rank(grad @ weight, grad_hidden, down.t(), 1.0, owned=True)
        return grad_x, None, None, grad_down, grad_up, None


def _add_low_rank(base: torch.Tensor, hidden: torch.Tensor, up: torch.Tensor, scale: float, *,
                  owned: bool) -> torch.Tensor:
    """``base + scale * hidden @ up.T`` for 2-D ``base`` and ``hidden``: in place into ``base`` when the caller
    ``owned`` it (nothing else can hold it), else into a new tensor. Under torch.compile it is a product and an
    add, which inductor on a GPU fuses into the next elementwise kernel; an ``addmm`` into a full matrix would stay
    an extern product that first copies that matrix."""
    if torch.compiler.is_compiling():
        return torch.add(base, hidden @ up.t(), alpha=scale)
    if owned:  # autocast does not cast for in-place ops: done here (no-ops when the dtypes agree)
        return base.addmm_(hidden.to(base.dtype), up.t().to(base.dtype), alpha=scale)
    return torch.addmm(base, hidden, up.t(), alpha=scale)


# selective checkpointing's dispatch modes (forward, recomputation): they keep the outputs of products
_SELECTIVE_CHECKPOINTING = tuple(getattr(torch.utils.checkpoint, name, None)
                                 for name in ("_CachingTorchDispatchMode", "_CachedTorchDispatchMode"))


def _outputs_may_be_kept() -> bool:
    """Whether an op's output may be kept by someone other than its caller, so that it must not be changed in
    place: selective checkpointing keeps (and refuses mutated) the outputs of products; under torch.compile the
    compiler makes the choice."""
    if torch.compiler.is_compiling():
        return True
    modes = _get_current_dispatch_mode_stack()  # usually none
    return bool(modes) and (None in _SELECTIVE_CHECKPOINTING
                            or any(isinstance(m, _SELECTIVE_CHECKPOINTING) for m in modes))


def _fusable(base: nn.Module) -> bool:
    """A plain frozen ``nn.Linear`` without hooks: :class:`_FrozenLinearWithLora` can take its weights directly
    (an fp8 Linear or a hooked module runs through its own forward)."""
    return (type(base) is nn.Linear and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and not (base._forward_pre_hooks or base._forward_hooks or base._backward_pre_hooks
                     or base._backward_hooks))


class LoraLinear(nn.Module):
    """``base`` (a module with ``weight``, ``in_features`` and ``out_features``: ``nn.Linear``, an fp8 Linear)
    plus a trainable LoRA of ``rank`` and ``alpha`` under ``adapter_name``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, adapter_name: str = "default"):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_layer = base
        self.adapter_name = adapter_name
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        # peft's order of construction and initialisation, so that a seed gives peft's weights: both Linears
        # built (drawing their default init), then down drawn again and up zeroed
        down, up = nn.Linear(self.in_features, rank, bias=False), nn.Linear(rank, self.out_features, bias=False)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)
        device = base.weight.device
        self.lora_A = nn.ModuleDict({adapter_name: down.to(device)})
        self.lora_B = nn.ModuleDict({adapter_name: up.to(device)})

    @property
    def down(self) -> nn.Parameter:
        return self.lora_A[self.adapter_name].weight  # (r, in)

    @property
    def up(self) -> nn.Parameter:
        return self.lora_B[self.adapter_name].weight  # (out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down, self.up
        autocast = _autocast_enabled(x.device.type)
        if x.dtype != down.dtype and not autocast:
            out = self.base_layer(x)  # (..., out)
            low_rank = F.linear(F.linear(x.to(down.dtype), down), up) * self.scale
            return out + low_rank.to(out.dtype)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        if (torch.is_grad_enabled() and (x.requires_grad or down.requires_grad or up.requires_grad)
                and _fusable(self.base_layer)):
            return self._fused(x, down, up, dtype)
        out = self.base_layer(x)  # (..., out)
        hidden = F.linear(x, down)  # (..., r)
        flat, low_rank = out.reshape(-1, self.out_features), hidden.reshape(-1, self.rank)  # (tokens, out), (tokens, r)
        owned = out.dtype == dtype and self._owns_output(out)
        return _add_low_rank(flat, low_rank, up, self.scale, owned=owned).view(out.shape)

    def _owns_output(self, out: torch.Tensor) -> bool:
        """Whether the base output may be summed into in place: nothing but this call can hold it (no autograd,
        no checkpointing, no forward hook of the base that could have kept it)."""
        return not torch.is_grad_enabled() and not self.base_layer._forward_hooks and not _outputs_may_be_kept()

    def _fused(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The training call of a plain Linear base: one autograd Function computing in ``dtype`` (the autocast
        dtype, whose casts are made here, or ``x``'s)."""
        base = self.base_layer
        bias = None if base.bias is None else base.bias.to(dtype)
        out = _FrozenLinearWithLora.apply(x.reshape(-1, self.in_features).to(dtype), base.weight.to(dtype), bias,
                                          down.to(dtype), up.to(dtype), self.scale)  # (tokens, out)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, rank={self.rank}, alpha={self.alpha:g}"
