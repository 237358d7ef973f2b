"""Qwen-Image VAE: parity with diffusers' AutoencoderKLQwenImage, tiling, structure, config."""

from __future__ import annotations

import math

import pytest
import torch
from reference_vae import TINY_VAE_CONFIG, tiny_reference_vae

from diffusmith.errors import DiffusmithError
from diffusmith.models.qwen_image.vae import (
    PRESETS,
    AttentionBlock,
    QwenImageVAE,
    QwenImageVAEConfig,
    feather_weights,
    tile_spans,
)

PARITY_TOL = 1e-4
TILING_TOL = 1e-3


@pytest.fixture(scope="module")
def pair():
    """(reference, ours) holding the same random weights."""
    ref = tiny_reference_vae(seed=0)
    ours = QwenImageVAE(QwenImageVAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def smooth_image(height: int, width: int, batch: int = 1) -> torch.Tensor:
    """A low-frequency colour sinusoid in [-0.8, 0.8]. (B, 3, H, W)"""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    channels = [0.8 * torch.sin(2 * math.pi * (0.5 * xx + 0.3 * yy) + phase) for phase in (0.0, 2.0, 4.0)]
    return torch.stack(channels)[None].repeat(batch, 1, 1, 1)


def latent_stats() -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(TINY_VAE_CONFIG["latents_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(TINY_VAE_CONFIG["latents_std"]).view(1, -1, 1, 1, 1)
    return mean, std


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
@torch.no_grad()
def test_encode_matches_reference(pair, size):
    ref, ours = pair
    torch.manual_seed(1)
    image = torch.rand(2, 3, *size) * 2 - 1
    mean, std = latent_stats()
    # What the reference pipelines hand the DiT: posterior mean, then (z - mean) / std; frame 0.
    expected = ((ref.encode(image[:, :, None]).latent_dist.mode() - mean) / std)[:, :, 0]
    got = ours.encode(image)
    assert got.shape == (2, 16, size[0] // 8, size[1] // 8)
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    assert (got - expected).abs().max().item() <= PARITY_TOL


@pytest.mark.parametrize("size", [(4, 4), (4, 6)])
@torch.no_grad()
def test_decode_matches_reference(pair, size):
    ref, ours = pair
    torch.manual_seed(2)
    latents = torch.randn(2, 16, *size)
    mean, std = latent_stats()
    # The reference pipeline's decode: z * std + mean, decode (clamped to [-1, 1]), frame 0.
    expected = ref.decode(latents[:, :, None] * std + mean).sample[:, :, 0]
    got = ours.decode(latents)
    assert got.shape == (2, 3, size[0] * 8, size[1] * 8)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= PARITY_TOL


@torch.no_grad()
def test_bfloat16_runs_close_to_float32(pair):
    _, ours = pair
    image = smooth_image(32, 32)
    lat32 = ours.encode(image)
    lat16 = ours.to(torch.bfloat16).encode(image.bfloat16())
    img16 = ours.decode(lat32.bfloat16())
    ours.float()
    assert lat16.dtype == img16.dtype == torch.bfloat16
    assert (lat16.float() - lat32).abs().max().item() < 0.1
    assert (img16.float() - ours.decode(lat32)).abs().max().item() < 0.1


# ---------------------------------------------------------------------------------------------- tiling


@pytest.fixture(scope="module")
def local_vae(pair):
    """Our tiny VAE with its mid-block attentions switched off (zero output projection).

    The mid-block attention is global: it sees the whole tile, so no tiling of it can equal the untiled
    result (measured with it on: ~4e-2 encode, ~1e-3 decode on the picture below). Without it the model
    keeps the real model's convolutional receptive field, and tiling must be exact to TILING_TOL."""
    _, ours = pair
    local = QwenImageVAE(ours.config).eval()
    local.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for module in local.modules():
            if isinstance(module, AttentionBlock):
                module.proj.weight.zero_()
                module.proj.bias.zero_()
    return local


def count_calls(module: torch.nn.Module) -> tuple[list[tuple[int, ...]], object]:
    shapes: list[tuple[int, ...]] = []
    handle = module.register_forward_hook(lambda _m, args, _out: shapes.append(tuple(args[0].shape)))
    return shapes, handle


@torch.no_grad()
def test_tiled_encode_and_decode_match_untiled(local_vae):
    vae = local_vae
    image = smooth_image(384, 320)  # latents 48 x 40
    tile_size, tile_stride = (40, 36), (8, 8)  # 2 x 2 tiles, overlapping by 32 latents

    calls, handle = count_calls(vae.encoder)
    untiled = vae.encode(image)
    tiled = vae.encode(image, tiled=True, tile_size=tile_size, tile_stride=tile_stride)
    handle.remove()
    assert calls == [(1, 3, 384, 320)] + [(1, 3, 320, 288)] * 4
    assert (tiled - untiled).abs().max().item() <= TILING_TOL

    calls, handle = count_calls(vae.decoder)
    untiled_image = vae.decode(untiled)
    tiled_image = vae.decode(untiled, tiled=True, tile_size=tile_size, tile_stride=tile_stride)
    handle.remove()
    assert calls == [(1, 16, 48, 40)] + [(1, 16, 40, 36)] * 4
    assert tiled_image.shape == untiled_image.shape == image.shape
    assert untiled_image.abs().max() > 0.1
    assert (tiled_image - untiled_image).abs().max().item() <= TILING_TOL


@torch.no_grad()
def test_picture_within_one_tile_runs_untiled(pair):
    _, ours = pair
    image = smooth_image(64, 48)
    calls, handle = count_calls(ours.encoder)
    tiled = ours.encode(image, tiled=True)  # default tiles: 128 latents
    handle.remove()
    assert len(calls) == 1
    assert torch.equal(tiled, ours.encode(image))


def test_tile_spans_cover_with_full_tiles():
    assert tile_spans(48, 36, 8) == [(0, 36), (8, 44), (12, 48)]
    assert tile_spans(40, 32, 8) == [(0, 32), (8, 40)]
    assert tile_spans(20, 32, 8) == [(0, 20)]


@pytest.mark.parametrize(("length", "size", "stride"), [(48, 36, 8), (100, 32, 16), (70, 20, 3), (33, 8, 8)])
def test_feather_weights_blend_without_gaps(length, size, stride):
    total = torch.zeros(length)
    for start, end in tile_spans(length, size, stride):
        total[start:end] += feather_weights(end - start, size - stride, start > 0, end < length, 1 / 3)
    assert total.min() > 0
    # Where exactly two tiles meet with the nominal overlap, the weights are a partition of unity.
    if (length - size) % stride == 0 and 2 * stride >= size:
        assert torch.allclose(total, torch.ones(length))


def test_bad_inputs_raise():
    vae = QwenImageVAE(PRESETS["tiny"])
    with pytest.raises(DiffusmithError):
        vae.encode(torch.zeros(1, 3, 36, 32))
    with pytest.raises(DiffusmithError):
        vae.encode(torch.zeros(1, 3, 64, 64), tiled=True, tile_size=4, tile_stride=6)
    with pytest.raises(DiffusmithError):
        vae.decode(torch.zeros(1, 4, 4, 4))


# ---------------------------------------------------------------------------------------------- structure


def test_real_preset_has_the_checkpoint_layout():
    from diffusers import AutoencoderKLQwenImage

    with torch.device("meta"):
        reference = AutoencoderKLQwenImage()
        ours = QwenImageVAE(PRESETS["real"])
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert list(our_shapes) == list(ref_shapes)
    assert len(our_shapes) == 194
    assert round(sum(p.numel() for p in ours.parameters()) / 1e6, 1) == 126.9


def test_config_from_dict_round_trips():
    from diffusers import AutoencoderKLQwenImage

    with torch.device("meta"):
        reference = AutoencoderKLQwenImage()
    ref_dict = {k: v for k, v in reference.config.items() if not k.startswith("_")}
    config = QwenImageVAEConfig.from_dict({**reference.config, "_class_name": "AutoencoderKLQwenImage"})
    assert config == PRESETS["real"]
    assert config.to_dict() == ref_dict
    assert QwenImageVAEConfig.from_dict(TINY_VAE_CONFIG) == PRESETS["tiny"]
    assert QwenImageVAEConfig.from_dict(TINY_VAE_CONFIG).to_dict() == TINY_VAE_CONFIG
    with pytest.raises(DiffusmithError):
        QwenImageVAEConfig.from_dict({**ref_dict, "latents_std": [1.0] * 4})
