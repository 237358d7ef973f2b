"""How to recognise Qwen-Image checkpoints from their keys and shapes (data only, no model code).

Names read ``qwen_image.<component>[.<layout>]``; the pipeline checks a loose file by name prefix.

Shapes are those of the real Qwen/Qwen-Image checkpoint; ``any_size=True`` lets the tiny test models with
the same structure match too (ranked below a file whose shapes are the real ones).
"""

from diffusmith.core.signatures import DIFFUSION_MODEL_PREFIXES, register_signature

register_signature(
    "qwen_image.dit",
    required={
        "img_in.weight": (3072, 64),
        "txt_norm.weight": (3584,),
        "txt_in.weight": (3072, 3584),
        "transformer_blocks.0.attn.add_q_proj.weight": (3072, 3072),
        "transformer_blocks.0.img_mod.1.weight": (18432, 3072),
    },
    prefixes=DIFFUSION_MODEL_PREFIXES,
    describe="Qwen-Image diffusion transformer (also Qwen-Image-Edit), diffusers key layout",
    any_size=True,
)

register_signature(
    "qwen_image.vae",
    required={
        "encoder.conv_in.weight": (96, 3, 3, 3, 3),
        "decoder.conv_in.weight": (384, 16, 3, 3, 3),
        "quant_conv.weight": (32, 32, 1, 1, 1),
        "post_quant_conv.weight": (16, 16, 1, 1, 1),
        # RMS-norm "gamma" tells this 3D VAE apart from the 2D AutoencoderKL of Stable Diffusion.
        "encoder.mid_block.resnets.0.norm1.gamma": None,
    },
    prefixes=("", "vae.", "first_stage_model."),
    describe="Qwen-Image VAE (Wan-2.1-style causal 3D VAE), diffusers key layout",
    any_size=True,
)

register_signature(
    "qwen_image.wan_layout_vae",
    required={
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.middle.0.residual.0.gamma": None,
    },
    prefixes=("", "vae.", "first_stage_model."),
    # Named apart from "qwen_image.vae" on purpose: its keys need converting before our VAE can load them.
    describe="Qwen-Image / Wan 2.1 VAE in the original Wan key layout (ComfyUI single file), not diffusers'",
    any_size=True,
)

register_signature(
    "qwen_image.text_encoder.legacy",
    required={
        "model.embed_tokens.weight": (152064, 3584),
        "model.layers.0.self_attn.q_proj.weight": (3584, 3584),
        "model.layers.0.self_attn.k_proj.weight": (512, 3584),
        "visual.patch_embed.proj.weight": (1280, 3, 2, 14, 14),
    },
    prefixes=("", "text_encoder."),
    describe="Qwen2.5-VL text encoder of Qwen-Image, older transformers key layout (model.layers.*, visual.*)",
    any_size=True,
)

register_signature(
    "qwen_image.text_encoder",
    required={
        "model.language_model.embed_tokens.weight": (152064, 3584),
        "model.language_model.layers.0.self_attn.q_proj.weight": (3584, 3584),
        "model.language_model.layers.0.self_attn.k_proj.weight": (512, 3584),
        "model.visual.patch_embed.proj.weight": (1280, 3, 2, 14, 14),
    },
    prefixes=("", "text_encoder."),
    describe="Qwen2.5-VL text encoder of Qwen-Image, current transformers key layout (model.language_model.*)",
    any_size=True,
)
