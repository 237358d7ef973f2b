"""The layer a LoRA trains in: a frozen Linear plus a low-rank update, never merged.

``y = base(x) + scale * (x @ down.T) @ up.T`` with ``scale = alpha / rank``. The second product and the sum
are one ``addmm`` with the base output as its accumulator and the scale as its ``alpha``, so a layer runs
three matrix products and nothing else: no pass over the output for the scale, none for the sum (peft's
layer makes both, and their backward, for every layer, and spends several module calls of Python on each).
On a GPU, where a mid-size step is bound by kernel launches, that is about a tenth of the step's kernels.

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
from torch import nn

__all__ = ["LoraLinear"]


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta: shape-only FLOP counting)
        return False


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
        out = self.base_layer(x)  # (..., out)
        down, up = self.down, self.up
        if x.dtype != down.dtype and not _autocast_enabled(x.device.type):
            low_rank = F.linear(F.linear(x.to(down.dtype), down), up) * self.scale
            return out + low_rank.to(out.dtype)
        hidden = F.linear(x, down)  # (..., r)
        summed = torch.addmm(out.reshape(-1, self.out_features), hidden.reshape(-1, self.rank), up.t(),
                             alpha=self.scale)  # (tokens, out)
        return summed.view(out.shape)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, rank={self.rank}, alpha={self.alpha:g}"
