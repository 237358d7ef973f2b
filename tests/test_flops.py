"""The FLOP counts behind benchmarks/gpu.py's MFU: counted on the meta device, checked against the architecture's
formula, against a real CPU run, and for the exactness of the per-block extrapolation."""

from __future__ import annotations

import dataclasses

import flops
import gpu
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusmith.models.qwen_image.dit import PRESETS

META = torch.device("meta")
# tiny widths with the real model's structure; 64 px = 16 image tokens
ARGS = ["--size", "64", "--text-len", "8", "--rank", "4"]


def tiny(layers: int):
    return dataclasses.replace(PRESETS["tiny"], num_layers=layers)


def count(argv: list[str], cfg, device=META, fused_attention: bool = False) -> int:
    step, _, _ = gpu.make_step(gpu.parse_args(ARGS + argv), gpu.build_dit(cfg, device), device)
    return flops.count_flops(step, fused_attention=fused_attention)


def test_counted_forward_is_the_architectures_products():
    """One CFG step is two forwards; the count must equal the formula of the reference architecture minus the
    last block's text work that diffusmith skips (its text queries and everything after its attention)."""
    cfg = tiny(3)
    image, text = 16, 8
    d, mlp = cfg.inner_dim, cfg.mlp_ratio * cfg.inner_dim
    skipped = (2 * text * (d * d + d * d + 2 * d * mlp)  # add_q_proj, to_add_out, txt_mlp
               + 4 * text * (text + image) * d)  # the text queries' rows of Q K^T and P V
    expected = 2 * (flops.dit_forward_flops(cfg, image, text) - skipped)
    assert count(["--infer"], cfg) == expected


def test_meta_count_is_a_real_runs_count():
    """A LoRA training step on real CPU tensors (plain-products attention, which torch's counter sees) runs the
    products the meta count gives, checkpointing's recomputation included."""
    cfg = tiny(3)
    with sdpa_kernel(SDPBackend.MATH):
        real = count([], cfg, device=torch.device("cpu"))
    assert real == count([], cfg)


def test_extrapolated_count_is_exact():
    args = gpu.parse_args(ARGS + ["--gc-mode", "selective"])
    cfg = tiny(5)
    counted = gpu.step_flops(args, cfg)
    assert counted["hardware"] == count(["--gc-mode", "selective"], cfg, fused_attention=True)
    assert counted["model"] == count(["--no-gc"], cfg)


def test_lora_step_model_flops_have_no_frozen_weight_gradients():
    """A forward and the input gradients (attention's twice its forward): between 2 and 3 forwards, where
    computing the frozen weights' gradients too would make it 3."""
    cfg = tiny(3)
    forward = count(["--infer", "--negative-len", "8"], cfg) / 2
    model = count(["--no-gc"], cfg)
    assert 2 * forward < model < 3 * forward


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recomputation_is_hardware_not_model_flops(mode):
    cfg = tiny(4)
    counted = gpu.step_flops(gpu.parse_args(ARGS + ["--gc-mode", mode]), cfg)
    unchecked = count(["--no-gc"], cfg, fused_attention=True)
    assert counted["hardware"] > unchecked > counted["model"]  # the fused kernel recomputes the scores too


def test_a_batched_cfg_calls_padding_is_hardware_not_model_flops():
    cfg = tiny(3)
    counted = gpu.step_flops(gpu.parse_args(ARGS + ["--infer", "--negative-len", "4", "--batch-cfg"]), cfg)
    separate = gpu.step_flops(gpu.parse_args(ARGS + ["--infer", "--negative-len", "4"]), cfg)
    assert counted["model"] == separate["model"] == separate["hardware"] < counted["hardware"]
