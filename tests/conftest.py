"""Shared fixtures: one tiny random Qwen-Image built with the reference (diffusers + transformers) and saved
in the official folder layout, reused by every pipeline-level test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the tests' reference_* helper modules
# benchmarks/common.py: the exact CPU memory trace (PeakMemory) the memory tests measure with
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

# Qwen-Image's scheduler_config.json (values from the official repo)
QWEN_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


# a DiT wide enough to represent a 64-value latent token (the tiny width 32 is not): for training tests
WIDE_DIT = {"attention_head_dim": 32, "num_attention_heads": 4, "axes_dims_rope": [8, 12, 12]}


def build_reference_pipeline(folder: Path, **dit_overrides):
    """A diffusers QwenImagePipeline of tiny random models, saved to ``folder``; returns the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import QwenImagePipeline as ReferencePipeline
    from reference_dit import tiny_reference_dit
    from reference_text import build_tiny_tokenizer, tiny_reference_text_encoder
    from reference_vae import tiny_reference_vae

    tokenizer = build_tiny_tokenizer(folder / "_tokenizer_build")
    pipe = ReferencePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG),
        vae=tiny_reference_vae(seed=1),
        text_encoder=tiny_reference_text_encoder(vocab_size=len(tokenizer), seed=2),
        tokenizer=tokenizer,
        transformer=tiny_reference_dit(seed=3, **dit_overrides),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """(folder in the official layout, the reference pipeline holding the same weights)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_qwen_image")
    ref = build_reference_pipeline(folder)
    ref.set_progress_bar_config(disable=True)
    return folder, ref


@pytest.fixture(scope="session")
def wide_qwen(tmp_path_factory):
    """The tiny pipeline with a wider DiT (4 heads x 32), in the official layout, for overfitting tests."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wide_qwen_image")
    build_reference_pipeline(folder, **WIDE_DIT)
    return folder
