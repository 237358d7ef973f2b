"""Qwen-Image VAE: a Wan-2.1-style causal 3D VAE, run here on single images.

The checkpoint stores a video VAE (causal Conv3d everywhere, temporal up/down-sampling convs). On one frame
most of that machinery collapses, and this file exploits it while keeping every parameter exactly as the
checkpoint stores it (same names, 5-D conv weights), so the official weights load with strict=True:

- A causal Conv3d pads (kt - 1) zero frames *before* the first frame, so on a single frame only the last
  temporal slice of its kernel meets real data: it is a 2-D conv with ``weight[:, :, -1]``.
- The temporal resampling convs (``time_conv``) are skipped on the first frame by the reference (the
  encoder caches the frame, the decoder marks it "Rep"), so they are stored but never run.

Pixels are in [-1, 1]; 8x spatial compression; the latents handed out and taken in are *normalized*
(``(mean - latents_mean) / latents_std``), i.e. exactly what the DiT consumes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DiffusmithError

logger = logging.getLogger(__name__)

# Per-channel statistics of the real VAE's posterior means (from the checkpoint's vae/config.json).
REAL_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
REAL_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class QwenImageVAEConfig:
    """Sizes of the VAE. Field names are those of the official vae/config.json (diffusers spelling,
    including its ``temperal_downsample``)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    input_channels: int = 3
    latents_mean: tuple[float, ...] = REAL_LATENTS_MEAN
    latents_std: tuple[float, ...] = REAL_LATENTS_STD

    def __post_init__(self) -> None:
        # Accept lists (as read from JSON) but store tuples, so configs compare and hash by value.
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise DiffusmithError(
                f"VAE config: temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries, "
                f"got {len(self.temperal_downsample)}; fix the VAE config.json."
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise DiffusmithError(
                    f"VAE config: {name} needs z_dim = {self.z_dim} values, got {len(getattr(self, name))}; "
                    "fix the VAE config.json."
                )

    @property
    def spatial_ratio(self) -> int:
        """Pixels per latent along each side (8 for the real model)."""
        return 2 ** len(self.temperal_downsample)

    @classmethod
    def from_dict(cls, d: dict) -> QwenImageVAEConfig:
        """Build from the official vae/config.json dict; keys starting with "_" are ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            logger.warning("Ignoring unknown VAE config keys: %s", ", ".join(unknown))
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        """The config as the official config.json spells it (lists, diffusers key names)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


PRESETS: dict[str, QwenImageVAEConfig] = {
    "real": QwenImageVAEConfig(),
    # Same depth, multipliers and resampling as the real model (so the same receptive field, which is what
    # tiling cares about), with 12x fewer channels.
    "tiny": QwenImageVAEConfig(base_dim=8),
}


# ----------------------------------------------------------------------------------------------------------
# Blocks. Every activation is one frame, (B, C, H, W).
# ----------------------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """A causal Conv3d as stored in the checkpoint, applied to a single frame.

    Causal padding puts kt - 1 zero frames before the frame, so only the last temporal kernel slice
    touches data: the result is a 2-D conv with ``weight[:, :, -1]`` and the same spatial padding."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__(in_dim, out_dim, kernel_size)
        self.spatial_padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, -1], self.bias, padding=self.spatial_padding)


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels: x / ||x||_C * sqrt(C) * gamma (no eps beyond F.normalize's).

    ``gamma`` keeps the checkpoint's shape: (C, 1, 1, 1) in conv blocks, (C, 1, 1) in attention."""

    def __init__(self, dim: int, gamma_ndim: int = 4) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * (gamma_ndim - 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reduced precision loses too much in the sum of squares: normalize in fp32.
        low_precision = x.dtype in (torch.float16, torch.bfloat16)
        x_normed = F.normalize(x.float() if low_precision else x, dim=1).to(x.dtype)
        return x_normed * self.scale * self.gamma.view(1, -1, 1, 1)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = ChannelRMSNorm(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.conv_shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of the frame."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = ChannelRMSNorm(dim, gamma_ndim=3)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (B, H*W, 3C)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # 3 x (B, 1, H*W, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj(out)


class MidBlock(nn.Module):
    """Residual block, attention, residual block (at the lowest resolution)."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])  # registered first, as in the checkpoint
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Halve H and W: pad right/bottom by one, 3x3 conv with stride 2.

    With ``temporal`` the checkpoint also holds a ``time_conv`` that halves the frame count; the first
    frame bypasses it, so it is stored and never run here."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if temporal:
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class Upsample(nn.Module):
    """Double H and W (nearest), 3x3 conv that also halves the channels.

    With ``temporal`` the checkpoint also holds a ``time_conv`` that doubles the frame count; the first
    frame bypasses it, so it is stored and never run here."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
        )
        if temporal:
            self.time_conv = nn.Conv3d(dim, dim * 2, (3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, upsample: str | None) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([ResidualBlock(i, o, dropout) for i, o in pairwise(dims)])
        self.upsamplers = None
        if upsample is not None:
            self.upsamplers = nn.ModuleList([Upsample(out_dim, temporal=upsample == "3d")])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """(B, 3, H, W) pixels -> (B, out_dim, H/8, W/8) (posterior mean and log-variance, stacked)."""

    def __init__(self, cfg: QwenImageVAEConfig, out_dim: int) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.input_channels, dims[0], 3, padding=1)

        # One flat list, as in the checkpoint: per level, the residual blocks (each followed by attention
        # when the level's scale is in attn_scales), then a downsample except after the last level.
        blocks: list[nn.Module] = []
        scale = 1.0
        for level, (in_dim, level_dim) in enumerate(pairwise(dims)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, level_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(level_dim))
                in_dim = level_dim
            if level != len(cfg.dim_mult) - 1:
                blocks.append(Downsample(level_dim, temporal=cfg.temperal_downsample[level]))
                scale /= 2.0
        self.down_blocks = nn.ModuleList(blocks)

        self.mid_block = MidBlock(dims[-1], cfg.dropout)
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], out_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """(B, z_dim, h, w) raw latents -> (B, 3, 8h, 8w) pixels (unclamped).

    Each upsample halves the channels, so every level after the first takes half of the previous width.
    The decoder has no attention outside its mid block (the reference ignores attn_scales here)."""

    def __init__(self, cfg: QwenImageVAEConfig) -> None:
        super().__init__()
        mults = cfg.dim_mult[::-1]
        dims = [cfg.base_dim * m for m in (mults[0], *mults)]
        temporal_up = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], cfg.dropout)

        blocks = []
        for level, (in_dim, out_dim) in enumerate(pairwise(dims)):
            if level > 0:
                in_dim //= 2
            upsample = None
            if level != len(cfg.dim_mult) - 1:
                upsample = "3d" if temporal_up[level] else "2d"
            blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, cfg.dropout, upsample))
        self.up_blocks = nn.ModuleList(blocks)

        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.input_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


# ----------------------------------------------------------------------------------------------------------
# Tiling: overlapping tiles on the latent grid, blended with linear feathering.
# ----------------------------------------------------------------------------------------------------------


# Fraction of each overlap, at the tile's edge, that gets no weight in the blend. The edge of a tile sees
# zero padding where the whole picture has content, and in a conv net as deep as this one that error
# reaches ~8 latents in (tiny model measured: ~0.4 at the edge, ~1e-3 at 8 latents). A ramp starting at
# the very edge lets it leak through (max error ~ edge error / overlap); skipping the outer third and
# ramping over the middle third makes tiled equal untiled to ~1e-4 once the overlap is ~24 latents.
TILE_EDGE_SKIP = 1 / 3


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise DiffusmithError(
            f"{name} must be a positive int or an (h, w) pair of positive ints (latent units), got {value!r}."
        )
    return pair


def tile_spans(length: int, size: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) of overlapping tiles of ``size`` every ``stride`` covering [0, length).

    The last tile is moved back to end exactly at ``length``, so every tile has full size."""
    if length <= size:
        return [(0, length)]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return [(s, s + size) for s in starts]


def feather_weights(n: int, overlap: int, ramp_in: bool, ramp_out: bool, margin: float) -> torch.Tensor:
    """1-D blending weights of one tile of ``n`` samples. (n,)

    On a side that overlaps a neighbour by ``overlap`` samples, the outer ``margin * overlap`` samples get
    weight 0 (the zero padding at a tile edge corrupts everything within the receptive field of it), the
    weight then rises linearly to 1 over the middle of the overlap, mirroring the neighbour's fall, so the
    weights of two neighbours sum to 1. Other sides and the interior get weight 1."""
    skip = int(margin * overlap)
    ramp = overlap - 2 * skip
    i = torch.arange(min(overlap, n), dtype=torch.float32)
    up = ((i - skip + 1) / (ramp + 1)).clamp(0.0, 1.0)
    w = torch.ones(n)
    if ramp_in:
        w[: len(up)] = torch.minimum(w[: len(up)], up)
    if ramp_out:
        w[n - len(up) :] = torch.minimum(w[n - len(up) :], up.flip(0))
    return w


def run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grid: tuple[int, int],
    tile_size: tuple[int, int],
    tile_stride: tuple[int, int],
    in_scale: int,
    out_scale: int,
    margin: float = TILE_EDGE_SKIP,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of ``x`` and blend the results.

    Tiles are laid out on ``grid`` (the latent grid, (h, w)); a tile spanning latent rows [r0, r1) reads
    x rows [r0 * in_scale, r1 * in_scale) and ``fn`` must return rows [r0 * out_scale, r1 * out_scale)
    of the output. Overlapping results are blended with ``feather_weights`` (overlap = size - stride)."""
    rows = tile_spans(grid[0], tile_size[0], tile_stride[0])
    cols = tile_spans(grid[1], tile_size[1], tile_stride[1])
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)  # the picture fits in one tile
    overlap_h = (tile_size[0] - tile_stride[0]) * out_scale
    overlap_w = (tile_size[1] - tile_stride[1]) * out_scale
    out = weight = None
    for r0, r1 in rows:
        for c0, c1 in cols:
            y = fn(x[:, :, r0 * in_scale : r1 * in_scale, c0 * in_scale : c1 * in_scale])
            if out is None:
                b, c = y.shape[:2]
                # Accumulate in fp32 so bf16 tiles do not lose precision in the weighted sum.
                out = torch.zeros(b, c, grid[0] * out_scale, grid[1] * out_scale, device=y.device)
                weight = torch.zeros(1, 1, grid[0] * out_scale, grid[1] * out_scale, device=y.device)
            wh = feather_weights(y.shape[2], overlap_h, r0 > 0, r1 < grid[0], margin)
            ww = feather_weights(y.shape[3], overlap_w, c0 > 0, c1 < grid[1], margin)
            mask = (wh[:, None] * ww[None, :]).to(y.device)  # (h, w)
            window = (slice(None), slice(None), slice(r0 * out_scale, r1 * out_scale),
                      slice(c0 * out_scale, c1 * out_scale))  # fmt: skip
            out[window] += y.float() * mask
            weight[window] += mask
    return (out / weight).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------------------


class QwenImageVAE(nn.Module):
    """Image <-> normalized latents. State dict = diffusers' AutoencoderKLQwenImage (strict)."""

    def __init__(self, config: QwenImageVAEConfig) -> None:
        super().__init__()
        self.config = config
        z = config.z_dim
        self.encoder = Encoder(config, out_dim=2 * z)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, 1)
        self.post_quant_conv = CausalConv3d(z, z, 1)
        self.decoder = Decoder(config)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Built from the config on each call (not buffers) so the state dict stays the checkpoint's.
        mean = torch.tensor(self.config.latents_mean, device=like.device).view(1, -1, 1, 1)
        std = torch.tensor(self.config.latents_std, device=like.device).view(1, -1, 1, 1)
        return mean, std

    def encode_tile(self, image: torch.Tensor) -> torch.Tensor:
        """Posterior mean, not normalized, of a whole (sub-)picture: (B, 3, H, W) -> (B, z, H/8, W/8)."""
        moments = self.quant_conv(self.encoder(image))  # (B, 2z, h, w): mean, log-variance
        return moments[:, : self.config.z_dim]

    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        """Raw (not normalized) latents -> unclamped pixels: (B, z, h, w) -> (B, 3, 8h, 8w)."""
        return self.decoder(self.post_quant_conv(z))

    def encode(
        self,
        image: torch.Tensor,
        tiled: bool = False,
        tile_size: int | tuple[int, int] = 128,
        tile_stride: int | tuple[int, int] = 64,
    ) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalized latents (B, z_dim, H/8, W/8).

        Uses the posterior mean (deterministic). ``tile_size``/``tile_stride`` are in latent units."""
        ratio = self.config.spatial_ratio
        if image.ndim != 4 or image.shape[1] != self.config.input_channels:
            raise DiffusmithError(
                f"VAE encode expects images shaped (B, {self.config.input_channels}, H, W), got {tuple(image.shape)}."
            )
        h, w = image.shape[-2:]
        if h % ratio or w % ratio:
            raise DiffusmithError(f"Image size {h}x{w} is not a multiple of {ratio}; resize or crop the image.")
        if tiled:
            size, stride = self._check_tiling(tile_size, tile_stride)
            mean = run_tiled(self.encode_tile, image, (h // ratio, w // ratio), size, stride, ratio, 1)
        else:
            mean = self.encode_tile(image)
        lat_mean, lat_std = self._latent_stats(mean)
        return ((mean.float() - lat_mean) / lat_std).to(mean.dtype)

    def decode(
        self,
        latents: torch.Tensor,
        tiled: bool = False,
        tile_size: int | tuple[int, int] = 128,
        tile_stride: int | tuple[int, int] = 64,
    ) -> torch.Tensor:
        """Normalized latents (B, z_dim, h, w) -> image (B, 3, 8h, 8w) clamped to [-1, 1].

        ``tile_size``/``tile_stride`` are in latent units."""
        if latents.ndim != 4 or latents.shape[1] != self.config.z_dim:
            raise DiffusmithError(
                f"VAE decode expects latents shaped (B, {self.config.z_dim}, h, w), got {tuple(latents.shape)}."
            )
        lat_mean, lat_std = self._latent_stats(latents)
        z = (latents.float() * lat_std + lat_mean).to(latents.dtype)
        if tiled:
            size, stride = self._check_tiling(tile_size, tile_stride)
            ratio = self.config.spatial_ratio
            image = run_tiled(self.decode_tile, z, tuple(z.shape[-2:]), size, stride, 1, ratio)
        else:
            image = self.decode_tile(z)
        return image.clamp(-1.0, 1.0)

    @staticmethod
    def _check_tiling(
        tile_size: int | tuple[int, int], tile_stride: int | tuple[int, int]
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        size, stride = _pair(tile_size, "tile_size"), _pair(tile_stride, "tile_stride")
        if stride[0] > size[0] or stride[1] > size[1]:
            raise DiffusmithError(
                f"tile_stride {stride} is larger than tile_size {size}: tiles would leave gaps; "
                "use a stride at most the tile size."
            )
        return size, stride
