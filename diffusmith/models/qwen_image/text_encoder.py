"""Qwen-Image text encoder: Qwen2.5-VL-7B (transformers' model) and the prompt encoding around it.

The network itself is transformers' ``Qwen2_5_VLForConditionalGeneration``, built from its config (never
``from_pretrained``) so the loader can construct it on the meta device and fill it with ``assign=True``.
This file adds what Qwen-Image needs on top of it, reading top to bottom:

1. config (``config_from_dict``) and the size presets (``PRESETS``),
2. construction (``build_text_encoder``) and the buffers to recompute after a meta-device load
   (``reset_buffers``),
3. checkpoint key layouts (``LEGACY_TO_CURRENT``, ``detect_text_encoder_layout``),
4. prompt encoding (``PROMPT_TEMPLATE``, ``tokenize_prompts``, ``select_prompt_tokens``, ``encode_prompt``)
   and the tokenizer (``load_tokenizer``).

Prompt encoding matches the reference pipeline (diffusers' ``QwenImagePipeline.encode_prompt``): each prompt is
wrapped in a chat template, the language model's last hidden state (after its final norm) is taken, the 34
template-prefix tokens are dropped, padding is removed and redone on the right, and at most
``max_sequence_length`` tokens are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from diffusmith.core.convert import KeyConverter
from diffusmith.errors import DiffusmithError

__all__ = [
    "LEGACY_TO_CURRENT",
    "PRESETS",
    "PROMPT_TEMPLATE",
    "PROMPT_TEMPLATE_DROP",
    "TOKENIZER_MAX_LENGTH",
    "build_text_encoder",
    "config_from_dict",
    "detect_text_encoder_layout",
    "encode_prompt",
    "load_tokenizer",
    "reset_buffers",
    "select_prompt_tokens",
    "tokenize_prompts",
]

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------------


def config_from_dict(config: dict[str, Any] | Qwen2_5_VLConfig) -> Qwen2_5_VLConfig:
    """transformers' config from a ``text_encoder/config.json`` dict (flat or with ``text_config``).

    Keys starting with ``_`` (``_name_or_path``, ...) are ignored."""
    if isinstance(config, Qwen2_5_VLConfig):
        return config
    if not isinstance(config, dict):
        raise DiffusmithError(f"text encoder config must be a dict from config.json, got {type(config).__name__}")
    model_type = config.get("model_type", "qwen2_5_vl")
    if model_type != "qwen2_5_vl":
        raise DiffusmithError(
            f"text encoder config.json has model_type {model_type!r}; Qwen-Image needs a 'qwen2_5_vl' text encoder"
        )
    clean = {key: value for key, value in config.items() if not key.startswith("_")}
    return Qwen2_5_VLConfig.from_dict(clean)


# Special token ids of the "tiny" preset follow the tiny test tokenizer (tests/reference_text.py): 400 BPE
# tokens, then the Qwen2.5-VL special tokens in their real order (<|endoftext|> = 400, <|im_start|> = 401, ...).
PRESETS: dict[str, dict[str, Any]] = {
    # text_encoder/config.json of Qwen/Qwen-Image (Qwen2.5-VL-7B-Instruct), in the flat layout it is published in.
    "real": {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "image_token_id": 151655,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 128000,
        "max_window_layers": 28,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "video_token_id": 151656,
        "vision_config": {
            "depth": 32,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "hidden_act": "silu",
            "hidden_size": 1280,
            "in_channels": 3,
            "in_chans": 3,
            "initializer_range": 0.02,
            "intermediate_size": 3420,
            "model_type": "qwen2_5_vl",
            "num_heads": 16,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
        },
        "vision_end_token_id": 151653,
        "vision_start_token_id": 151652,
        "vision_token_id": 151654,
        "vocab_size": 152064,
    },
    # Text width 32 (the tiny DiT's joint_attention_dim); head_dim 16 -> 8 rotary frequencies = 2 + 3 + 3.
    "tiny": {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "bos_token_id": 400,
        "eos_token_id": 402,
        "hidden_act": "silu",
        "hidden_size": 32,
        "image_token_id": 412,
        "intermediate_size": 64,
        "max_position_embeddings": 2048,
        "max_window_layers": 2,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "video_token_id": 413,
        "vision_config": {
            "depth": 2,
            "fullatt_block_indexes": [1],
            "hidden_act": "silu",
            "hidden_size": 16,
            "in_channels": 3,
            "intermediate_size": 32,
            "model_type": "qwen2_5_vl",
            "num_heads": 2,
            "out_hidden_size": 32,
            "patch_size": 2,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 8,
        },
        "vision_end_token_id": 410,
        "vision_start_token_id": 409,
        "vision_token_id": 411,
        "vocab_size": 512,
    },
}

# ----------------------------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------------------------


def build_text_encoder(config: dict[str, Any] | Qwen2_5_VLConfig) -> Qwen2_5_VLForConditionalGeneration:
    """transformers' Qwen2.5-VL model (language model, vision tower, lm_head) built from its config.

    Works under ``with torch.device("meta"):``; after filling the weights with
    ``load_state_dict(..., assign=True)`` call :func:`reset_buffers`. Returned in eval mode."""
    model = Qwen2_5_VLForConditionalGeneration(config_from_dict(config))
    return model.eval()


def _rotary_inv_freq(module: nn.Module) -> torch.Tensor:
    # transformers' rotary modules name their rope kind in `rope_type`; the plain and the vision (axial) kinds
    # are computed by static methods of the module class, the scaled kinds by transformers' shared table.
    rope_type = getattr(module, "rope_type", None)
    compute = {
        "default": getattr(module, "compute_default_rope_parameters", None),
        "axial": getattr(module, "compute_axial_rope_parameters", None),
    }.get(rope_type) or ROPE_INIT_FUNCTIONS.get(rope_type)
    if compute is None:
        raise RuntimeError(f"cannot recompute the rotary buffer of {type(module).__name__} (rope_type {rope_type!r})")
    inv_freq, _ = compute(module.config)
    return inv_freq


def reset_buffers(model: nn.Module, device: torch.device | str | None = None) -> None:
    """Recompute the non-persistent buffers that a state dict does not carry: the rotary ``inv_freq`` (and its
    ``original_inv_freq`` copy) of the language model and of the vision tower.

    Built on the meta device, these buffers stay on meta after ``load_state_dict(assign=True)``; call this
    once the weights are in (transformers does the same in ``from_pretrained`` through ``_init_weights``).
    The buffers are float32, as transformers makes them, on ``device`` (default: the device of the model's
    first non-meta parameter, else CPU). A later ``model.to(dtype)`` would cast them too; the reference keeps
    them in float32, so cast the model before calling this, not after."""
    if device is None:
        device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    for module in model.modules():
        if "inv_freq" not in module._buffers:
            continue
        inv_freq = _rotary_inv_freq(module).to(device=device, dtype=torch.float32)
        module.inv_freq = inv_freq  # assigning to a registered buffer name keeps it a (non-persistent) buffer
        if "original_inv_freq" in module._buffers:
            module.original_inv_freq = inv_freq.clone()
    still_meta = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if still_meta:
        raise RuntimeError(f"buffers left on the meta device after reset_buffers: {still_meta}")


# ----------------------------------------------------------------------------------------------------------
# Checkpoint key layouts
# ----------------------------------------------------------------------------------------------------------

# The published checkpoint (Qwen/Qwen-Image text_encoder/) uses the layout of older transformers releases; the model
# built here uses the current one. lm_head.weight is named the same in both. transformers itself maps
# `^visual` -> `model.visual` and `^model(?!.language_model|.visual)` -> `model.language_model` on load; the
# explicit prefixes below do the same for this model and leave current-layout keys untouched.
# Use: `LEGACY_TO_CURRENT.convert(state_dict)`; `LEGACY_TO_CURRENT.reverse()` writes the legacy layout.
LEGACY_TO_CURRENT = KeyConverter(
    [
        ("model.embed_tokens", "model.language_model.embed_tokens"),
        ("model.layers", "model.language_model.layers"),
        ("model.norm", "model.language_model.norm"),
        ("visual", "model.visual"),
    ]
)

_LEGACY_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "visual.")
_CURRENT_PREFIXES = ("model.language_model.", "model.visual.")


def detect_text_encoder_layout(keys: Iterable[str]) -> Literal["legacy", "current"]:
    """Which key layout a Qwen2.5-VL state dict uses: ``"legacy"`` (``model.layers.*``, ``visual.*``: the
    published Qwen-Image checkpoint) or ``"current"`` (``model.language_model.*``, ``model.visual.*``)."""
    keys = list(keys)
    legacy = any(key.startswith(_LEGACY_PREFIXES) for key in keys)
    current = any(key.startswith(_CURRENT_PREFIXES) for key in keys)
    if legacy and current:
        raise DiffusmithError(
            "text encoder checkpoint mixes the legacy (model.layers.*) and current (model.language_model.*) "
            "key layouts; re-save it in one layout"
        )
    if legacy:
        return "legacy"
    if current:
        return "current"
    example = keys[0] if keys else "<no keys>"
    raise DiffusmithError(
        f"not a Qwen2.5-VL text encoder checkpoint (first key {example!r}); point to the text_encoder/ folder"
    )


# ----------------------------------------------------------------------------------------------------------
# Prompt encoding
# ----------------------------------------------------------------------------------------------------------

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# Tokens of the template before the prompt (system turn + "<|im_start|>user\n"), dropped from the output.
PROMPT_TEMPLATE_DROP = 34
# The most tokens kept per prompt after the drop (the reference truncates at 1024 + 34 tokens).
TOKENIZER_MAX_LENGTH = 1024

_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def load_tokenizer(folder: str | Path) -> Qwen2Tokenizer:
    """The Qwen2 tokenizer stored in a local folder (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``,
    with ``tokenizer_config.json``); never goes to the network."""
    path = Path(folder)
    if not path.is_dir():
        raise DiffusmithError(f"tokenizer folder {str(path)!r} does not exist; pass the checkpoint's tokenizer/ folder")
    if not any(all((path / name).is_file() for name in files) for files in _TOKENIZER_FILES):
        raise DiffusmithError(
            f"no tokenizer in {str(path)!r} (needs tokenizer.json or vocab.json + merges.txt); "
            "pass the checkpoint's tokenizer/ folder"
        )
    try:
        return Qwen2Tokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise DiffusmithError(f"cannot read the tokenizer in {str(path)!r}: {error}") from error


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (both (B, L) long) of the templated prompts, padded to the longest and cut
    at ``TOKENIZER_MAX_LENGTH + PROMPT_TEMPLATE_DROP`` tokens, as the reference does."""
    texts = [PROMPT_TEMPLATE.format(prompt) for prompt in prompts]
    tokens = tokenizer(
        texts,
        max_length=TOKENIZER_MAX_LENGTH + PROMPT_TEMPLATE_DROP,
        padding=True,
        truncation=True,
        return_tensors="pt",
    )
    return tokens["input_ids"], tokens["attention_mask"]


def select_prompt_tokens(
    hidden: torch.Tensor, attention_mask: torch.Tensor, max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """From the hidden states of templated prompts (B, L, D), keep each prompt's real tokens after the template
    prefix, right-padded with zeros to the longest and cut at ``max_sequence_length``.

    Returns (embeds (B, T, D), mask (B, T) long). Works for left or right tokenizer padding."""
    batch, _, width = hidden.shape
    # Index, never multiply: padded positions may hold NaN (fully masked attention rows).
    rows = [h[m][PROMPT_TEMPLATE_DROP:] for h, m in zip(hidden, attention_mask.bool(), strict=False)]  # each (L_i, D)
    length = min(max(row.shape[0] for row in rows), max_sequence_length)
    embeds = hidden.new_zeros(batch, length, width)  # (B, T, D)
    mask = torch.zeros(batch, length, dtype=torch.long, device=hidden.device)  # (B, T)
    for i, row in enumerate(rows):
        row = row[:length]
        embeds[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
    return embeds, mask


def _language_model(text_encoder: nn.Module) -> nn.Module:
    language_model = getattr(getattr(text_encoder, "model", None), "language_model", None)
    if language_model is None:
        raise DiffusmithError(
            f"encode_prompt needs the Qwen2.5-VL model from build_text_encoder, got {type(text_encoder).__name__}"
        )
    return language_model


def encode_prompt(
    text_encoder: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_sequence_length: int = 512,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings for Qwen-Image, equal to the reference pipeline's ``encode_prompt``.

    Returns (embeds (B, T, hidden) in ``dtype`` (default: the text encoder's), mask (B, T) long, or None when
    every position is a real token). Only the language model runs (no lm_head): its last hidden state after the
    final norm is what the reference reads as ``hidden_states[-1]``. Runs under the caller's grad mode; wrap it
    in ``torch.no_grad()`` when the text encoder is frozen."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
        raise DiffusmithError("encode_prompt needs a non-empty list of prompt strings")
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or not (
        1 <= max_sequence_length <= TOKENIZER_MAX_LENGTH
    ):
        raise DiffusmithError(
            f"max_sequence_length must be an integer from 1 to {TOKENIZER_MAX_LENGTH}, got {max_sequence_length!r}"
        )
    language_model = _language_model(text_encoder)
    device = torch.device(device) if device is not None else text_encoder.device
    dtype = dtype or text_encoder.dtype

    input_ids, attention_mask = tokenize_prompts(tokenizer, prompts)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # Text-only input: the reference passes no position ids either, so the language model uses 0..L-1 on all
    # three mrope axes (also under left padding).
    hidden = language_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    embeds, mask = select_prompt_tokens(hidden, attention_mask, max_sequence_length)
    embeds = embeds.to(device=device, dtype=dtype)
    return embeds, (None if bool(mask.all()) else mask)
