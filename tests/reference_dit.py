"""The reference Qwen-Image DiT (diffusers) at the tiny size, with every weight random, for parity tests."""

from __future__ import annotations

import torch
from diffusers import QwenImageTransformer2DModel

# diffusers-style transformer/config.json of the tiny DiT; equals diffusmith's PRESETS["tiny"].
TINY_DIT_CONFIG: dict = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "axes_dims_rope": [4, 6, 6],
    "guidance_embeds": False,
}


def tiny_reference_dit(seed: int = 0, **overrides) -> QwenImageTransformer2DModel:
    """A tiny reference DiT in fp32, eval mode, with all parameters re-drawn from ``seed``.

    Linear weights and biases get N(0, 0.1^2); norm scales get 1 + N(0, 0.1^2), so no weight is left at the
    reference's zero or one initialisation and every path of the math is exercised. ``overrides`` change
    the config (e.g. a wider model for training tests: the tiny width 32 is narrower than a 64-value token).
    """
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**{**TINY_DIT_CONFIG, **overrides})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            is_norm_scale = "norm" in name.split(".")[-2] and param.ndim == 1  # e.g. attn.norm_q.weight
            param.copy_(1.0 + noise if is_norm_scale else noise)
    return model.eval()
