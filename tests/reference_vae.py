"""A tiny random diffusers AutoencoderKLQwenImage, the reference for VAE parity tests."""

from __future__ import annotations

import torch

# diffusers kwargs of the tiny VAE: the real model's depth, multipliers and resampling (hence the same
# receptive field) with base_dim 8 instead of 96. z_dim 16 as everywhere else in the tiny pipeline.
TINY_VAE_CONFIG: dict = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "input_channels": 3,
    "latents_mean": [
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ],
    "latents_std": [
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ],
}  # fmt: skip


def tiny_reference_vae(seed: int = 0, config: dict | None = None):
    """diffusers AutoencoderKLQwenImage with random weights (fp32, eval mode).

    PyTorch's default init leaves the RMS-norm gains at exactly 1; they are re-drawn around 1 (and any
    all-zero tensor around 0) so a parity test notices a gain or bias that is ignored or misplaced."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(**(config or TINY_VAE_CONFIG))
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif torch.count_nonzero(p) == 0:
                p.copy_(0.02 * torch.randn_like(p))
    return vae.eval()
