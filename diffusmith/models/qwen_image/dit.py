"""Qwen-Image diffusion transformer: 60 dual-stream MMDiT blocks with joint text-image attention.

Reads top to bottom: config, presets, latent packing, rotary tables, blocks, model. The parameter names are
those of the official checkpoint (diffusers' ``QwenImageTransformer2DModel``), so its state dict loads as is.
``QwenImageDiT.forward`` is the whole model: it takes the ``(B, 16, h, w)`` latents and the scheduler's
timestep and returns the velocity in the same layout.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffusmith.core.attention import attention
from diffusmith.core.checkpointing import (
    check_checkpointing_interval,
    check_checkpointing_mode,
    checkpoints_block,
    gradient_checkpoint_forward,
)
from diffusmith.errors import DiffusmithError
from diffusmith.models.layers import (
    AdaLayerNormOut,
    FeedForward,
    RMSNorm,
    TimestepMLP,
    apply_rope,
    norm_modulate_keeping_input,
    rope_angles,
    rope_freqs_cis,
    timestep_embedding,
)

logger = logging.getLogger(__name__)

# Flags of the reference config for Qwen-Image variants this model does not implement: accepted when false.
_UNSUPPORTED_FLAGS = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")
# Present in the official transformer/config.json but unused by the model.
_IGNORED_KEYS = ("pooled_projection_dim",)


@dataclass(frozen=True)
class QwenImageDiTConfig:
    patch_size: int = 2
    in_channels: int = 64  # latent channels * patch_size**2
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584  # text encoder hidden size
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)  # (frame, row, column) channels; sum = head dim
    rope_theta: float = 10000.0
    timestep_embedding_dim: int = 256
    mlp_ratio: int = 4
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise DiffusmithError(
                f"axes_dims_rope {tuple(self.axes_dims_rope)} must be even sizes summing to "
                f"attention_head_dim={self.attention_head_dim}; fix the transformer config"
            )
        if self.in_channels % (self.patch_size**2):
            raise DiffusmithError(
                f"in_channels={self.in_channels} is not a multiple of patch_size**2={self.patch_size**2}; "
                "fix the transformer config"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        return self.in_channels // self.patch_size**2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QwenImageDiTConfig:
        """Build from an official ``transformer/config.json`` dict (diffusers keys; ``_*`` keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in _UNSUPPORTED_FLAGS:
                if value:
                    raise DiffusmithError(
                        f"Qwen-Image DiT option {key}=true is not supported; use a checkpoint whose "
                        f"transformer config has {key} false or absent"
                    )
                continue
            if key not in names:
                logger.warning("ignoring unknown Qwen-Image DiT config key %r", key)
                continue
            kwargs[key] = value
        if "axes_dims_rope" in kwargs:
            kwargs["axes_dims_rope"] = tuple(kwargs["axes_dims_rope"])
        if kwargs.get("out_channels", 0) is None:  # the reference's default: same as in_channels
            kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
        return cls(**kwargs)


PRESETS: dict[str, QwenImageDiTConfig] = {
    "real": QwenImageDiTConfig(),
    "tiny": QwenImageDiTConfig(
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Latent packing: the reference pipeline's order (pipeline_qwenimage.py _pack_latents / _unpack_latents)
# ----------------------------------------------------------------------------------------------------------


def patchify(latents: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """``(B, C, h, w)`` latents to ``(B, (h/p)*(w/p), C*p*p)`` tokens, row-major over the patch grid.

    Each token holds its patch channel-major: index ``c*p*p + dy*p + dx``.
    """
    b, c, h, w = latents.shape
    p = patch_size
    x = latents.reshape(b, c, h // p, p, w // p, p)  # (B, C, h/p, p, w/p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h/p, w/p, C, p, p)
    return x.reshape(b, (h // p) * (w // p), c * p * p)  # (B, N, C*p*p)


def unpatchify(tokens: torch.Tensor, h: int, w: int, patch_size: int = 2) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, (h/p)*(w/p), C*p*p)`` tokens to ``(B, C, h, w)``."""
    b, _, cpp = tokens.shape
    p = patch_size
    c = cpp // (p * p)
    x = tokens.reshape(b, h // p, w // p, c, p, p)  # (B, h/p, w/p, C, p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, h/p, p, w/p, p)
    return x.reshape(b, c, h, w)


# ----------------------------------------------------------------------------------------------------------
# Rotary position tables
# ----------------------------------------------------------------------------------------------------------


def centred_positions(n: int) -> torch.Tensor:
    """Positions ``-(n - n//2), ..., n//2 - 1``: the grid is centred on 0 (the reference's ``scale_rope``)."""
    return torch.arange(n) - (n - n // 2)


def joint_positions(grid_h: int, grid_w: int, text_len: int) -> torch.Tensor:
    """``(T + N, 3)`` (frame, row, column) positions of the joint sequence ``[text, image]``.

    Image tokens (row-major over the ``grid_h x grid_w`` patch grid) sit at frame 0 on a centred grid. Text
    token ``i`` sits at ``max(grid_h // 2, grid_w // 2) + i`` on all three axes, just past the image.
    """
    rows = centred_positions(grid_h)[:, None].expand(grid_h, grid_w)
    cols = centred_positions(grid_w)[None, :].expand(grid_h, grid_w)
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(grid_h * grid_w, 3)  # (N, 3)
    start = max(grid_h // 2, grid_w // 2)
    text = (start + torch.arange(text_len))[:, None].expand(text_len, 3)  # (T, 3)
    return torch.cat([text, image], dim=0)


@functools.lru_cache(maxsize=8)
def rope_tables(
    grid_h: int,
    grid_w: int,
    text_len: int,
    axes_dims: tuple[int, ...],
    theta: float,
    device: torch.device,
) -> torch.Tensor:
    """Cached complex64 rotation table ``(T + N, head_dim / 2)`` for the joint ``[text, image]`` sequence."""
    # Built outside inference mode so that a table first made while sampling can later be saved for backward.
    with torch.inference_mode(False), torch.no_grad():
        angles = rope_angles(joint_positions(grid_h, grid_w, text_len).to(device), axes_dims, theta)
        return rope_freqs_cis(angles)


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------


class QwenTimestepEmbedding(nn.Module):
    """Sinusoid of the timestep followed by an MLP (keys ``timestep_embedder.linear_1/2``)."""

    def __init__(self, sinusoid_dim: int, dim: int):
        super().__init__()
        self.sinusoid_dim = sinusoid_dim
        self.timestep_embedder = TimestepMLP(sinusoid_dim, dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``t`` ``(B,)`` is sigma (timestep / 1000); the sinusoid scales it back by 1000 as the reference."""
        emb = timestep_embedding(t, self.sinusoid_dim, freq_shift=0.0, scale=1000.0, flip_sin_to_cos=True)
        return self.timestep_embedder(emb.to(dtype))  # (B, D)


class QwenJointAttention(nn.Module):
    """Joint attention over ``[text, image]`` with separate projections and QK RMSNorm per stream."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        # Definition order follows the reference so that state_dict() lists keys in the checkpoint's order.
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.add_q_proj = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.to_add_out = nn.Linear(inner, dim)
        self.norm_added_q = RMSNorm(head_dim, eps)
        self.norm_added_k = RMSNorm(head_dim, eps)

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None,
        text_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """image ``(B, N, D)``, text ``(B, T, D)``, complex rope table ``(T + N, Dh/2)``, mask ``(B, T + N)``.

        Returns the attention outputs ``(image (B, N, D), text (B, T, D))`` after the output projections. With
        ``text_output=False`` only the image tokens query (the text still gives keys and values) and the text
        output is None: the same image output without the text rows' work.
        """
        text_len = text.shape[1]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.num_heads, self.head_dim))  # (B, L, H, Dh)

        img_q = self.norm_q(heads(self.to_q(image)))  # (B, N, H, Dh)
        if text_output:
            txt_q = self.norm_added_q(heads(self.add_q_proj(text)))  # (B, T, H, Dh)
            q = torch.cat([txt_q, img_q], dim=1)  # (B, T+N, H, Dh)
        else:
            q = img_q
        txt_k = self.norm_added_k(heads(self.add_k_proj(text)))
        img_k = self.norm_k(heads(self.to_k(image)))
        k = torch.cat([txt_k, img_k], dim=1)
        v = torch.cat([heads(self.add_v_proj(text)), heads(self.to_v(image))], dim=1)

        rope = rope[:, None, :]  # (T+N, 1, Dh/2), broadcast over heads
        q, k = apply_rope(q, rope if text_output else rope[text_len:]), apply_rope(k, rope)
        # Tokens-major memory with head-major views: the layout fused SDPA kernels read without a copy.
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)  # (B, H, Lq, Dh)
        out = out.transpose(1, 2).flatten(2)  # (B, Lq, H*Dh)
        if not text_output:
            return self.to_out[0](out), None
        return self.to_out[0](out[:, text_len:]), self.to_add_out(out[:, :text_len])


class QwenImageBlock(nn.Module):
    """Dual-stream MMDiT block: per-stream AdaLN modulation and MLP, one joint attention."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: int, eps: float):
        super().__init__()
        self.eps = eps
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = QwenJointAttention(dim, num_heads, head_dim, eps)
        self.img_mlp = FeedForward(dim, mlp_ratio * dim)
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mlp = FeedForward(dim, mlp_ratio * dim)

    def _norm_modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return norm_modulate_keeping_input(x, shift, scale, self.eps)

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        text_output: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """image ``(B, N, D)``, text ``(B, T, D)``, temb ``(B, D)``; returns ``(text, image)``.

        ``text_output=False`` (the last block, whose text result the model drops) skips the text stream's
        work after the joint attention and returns text None; the image result is the same."""
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(temb).chunk(6, -1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(temb).chunk(6, -1)

        img_attn, txt_attn = self.attn(
            self._norm_modulate(image, img_shift1, img_scale1),
            self._norm_modulate(text, txt_shift1, txt_scale1),
            image_rotary_emb,
            attention_mask,
            text_output,
        )
        image = image + img_gate1[:, None] * img_attn
        image = image + img_gate2[:, None] * self.img_mlp(self._norm_modulate(image, img_shift2, img_scale2))
        if image.dtype == torch.float16:  # the reference clips to the fp16 range
            image = image.clip(-65504, 65504)
        if not text_output:
            return None, image

        text = text + txt_gate1[:, None] * txt_attn
        text = text + txt_gate2[:, None] * self.txt_mlp(self._norm_modulate(text, txt_shift2, txt_scale2))
        if text.dtype == torch.float16:
            text = text.clip(-65504, 65504)
        return text, image


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


class QwenImageDiT(nn.Module):
    """Qwen-Image MMDiT: latents, timestep and prompt embeddings in, flow-matching velocity out."""

    # The block list that memory features (checkpointing, per-block offload) apply to, by attribute name.
    repeated_blocks = "transformer_blocks"
    # The Linears a LoRA trains by default (peft-style name suffixes): attention, MLPs and AdaLN modulation
    # of both streams in every block.
    default_lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
        "img_mod.1", "txt_mod.1",
    )

    def modules_without_gradient(self) -> list[str]:
        """Modules whose output never reaches the model's output: the last block's text stream after the
        joint attention (its text result is discarded, and the forward skips that work). Training freezes
        them so that data-parallel training needs no unused-parameter search."""
        last = f"transformer_blocks.{len(self.transformer_blocks) - 1}"
        # the text queries only shape the text result; text keys/values still reach the image
        return [f"{last}.attn.add_q_proj", f"{last}.attn.norm_added_q", f"{last}.attn.to_add_out",
                f"{last}.txt_mlp"]

    def __init__(self, config: QwenImageDiTConfig | None = None):
        super().__init__()
        config = config or PRESETS["real"]
        self.config = config
        dim = config.inner_dim
        self.time_text_embed = QwenTimestepEmbedding(config.timestep_embedding_dim, dim)
        self.txt_norm = RMSNorm(config.joint_attention_dim, config.eps)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [
                QwenImageBlock(dim, config.num_attention_heads, config.attention_head_dim, config.mlp_ratio, config.eps)
                for _ in range(config.num_layers)
            ]
        )
        self.norm_out = AdaLayerNormOut(dim, dim, config.eps)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * config.out_channels)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        use_gradient_checkpointing: bool = False,
        use_gradient_checkpointing_offload: bool = False,
        gradient_checkpointing_mode: str = "full",
        gradient_checkpointing_interval: int = 1,
    ) -> torch.Tensor:
        """Predict the velocity.

        Args:
            latents: ``(B, C, h, w)`` VAE latents (C = in_channels / patch_size**2; h, w multiples of patch_size).
            timestep: ``(B,)`` or one value: sigma * 1000, as the scheduler gives it.
            text: ``(B, T, joint_attention_dim)`` prompt embeddings.
            text_mask: ``(B, T)`` bool or 0/1, 1 = real token; None = all tokens real.
            use_gradient_checkpointing: recompute the blocks in backward instead of keeping their activations (all
                but the last, whose recomputation would save no memory: see :mod:`diffusmith.core.checkpointing`).
            use_gradient_checkpointing_offload: also keep the checkpointed block inputs in CPU memory.
            gradient_checkpointing_mode: ``"full"`` recomputes each checkpointed block whole; ``"selective"``
                keeps its matmul and attention outputs and recomputes only the elementwise work.
            gradient_checkpointing_interval: checkpoint every N-th block (1: all but the last).

        Returns:
            ``(B, out_channels, h, w)`` velocity in the model's dtype.
        """
        cfg = self.config
        p = cfg.patch_size
        batch, _, h, w = self._check_inputs(latents, timestep, text, text_mask)
        dtype = self.img_in.weight.dtype

        image = self.img_in(patchify(latents.to(dtype), p))  # (B, N, D)
        text = self.txt_in(self.txt_norm(text.to(dtype)))  # (B, T, D)

        # As the reference pipeline: timestep cast to the model dtype, then divided by 1000.
        timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(batch)
        temb = self.time_text_embed(timestep.to(dtype) / 1000, dtype)  # (B, D)

        rope = rope_tables(h // p, w // p, text.shape[1], tuple(cfg.axes_dims_rope), cfg.rope_theta, image.device)
        mask = None
        if text_mask is not None:
            image_keys = torch.ones(batch, image.shape[1], dtype=torch.bool, device=image.device)
            mask = torch.cat([text_mask.to(device=image.device, dtype=torch.bool), image_keys], dim=1)  # (B, T+N)

        num_blocks = len(self.transformer_blocks)
        check_checkpointing_mode(gradient_checkpointing_mode)
        check_checkpointing_interval(gradient_checkpointing_interval)
        for index, block in enumerate(self.transformer_blocks):
            checkpointed = checkpoints_block(index, num_blocks, gradient_checkpointing_interval)
            text, image = gradient_checkpoint_forward(
                block,
                use_gradient_checkpointing and checkpointed,
                use_gradient_checkpointing_offload and checkpointed,
                gradient_checkpointing_mode=gradient_checkpointing_mode,
                image=image,
                text=text,
                temb=temb,
                image_rotary_emb=rope,
                attention_mask=mask,
                text_output=index < num_blocks - 1,  # the model drops the last block's text result
            )

        out = self.proj_out(self.norm_out(image, temb))  # (B, N, p*p*out_channels)
        return unpatchify(out, h, w, p)

    def _check_inputs(
        self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> tuple[int, int, int, int]:
        cfg = self.config
        if latents.ndim != 4:
            raise DiffusmithError(f"latents must be (B, C, h, w), got shape {tuple(latents.shape)}")
        batch, channels, h, w = latents.shape
        if channels != cfg.latent_channels:
            raise DiffusmithError(f"latents have {channels} channels, the DiT expects {cfg.latent_channels}")
        if h % cfg.patch_size or w % cfg.patch_size:
            raise DiffusmithError(
                f"latent size {h}x{w} is not a multiple of {cfg.patch_size}; use an image size that is a "
                f"multiple of {8 * cfg.patch_size} pixels"
            )
        if torch.as_tensor(timestep).numel() not in (1, batch):
            raise DiffusmithError(
                f"timestep must hold 1 or {batch} values (one per sample), got {tuple(timestep.shape)}"
            )
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != cfg.joint_attention_dim:
            raise DiffusmithError(
                f"text embeddings must be ({batch}, T, {cfg.joint_attention_dim}), got {tuple(text.shape)}"
            )
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise DiffusmithError(
                f"text_mask must be {tuple(text.shape[:2])} like the text embeddings, got {tuple(text_mask.shape)}"
            )
        return batch, channels, h, w
