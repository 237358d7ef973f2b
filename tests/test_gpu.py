"""Checks that need a CUDA device (skipped without one): real device placement and bf16 on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusmith import QwenImagePipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def picture(pipe, **kw):
    args = dict(prompt="a red circle", negative_prompt=" ", cfg_scale=4.0, height=64, width=96,
                num_inference_steps=3, seed=5, progress_bar=False)
    args.update(kw)
    return np.asarray(pipe(**args), dtype=np.int16)


def test_cuda_picture_matches_the_reference(tiny_qwen):
    folder, _ = tiny_qwen
    from diffusers import QwenImagePipeline as Reference

    ref = Reference.from_pretrained(folder).to("cuda")
    ref.set_progress_bar_config(disable=True)
    expected = np.asarray(ref(prompt="a red circle", negative_prompt=" ", true_cfg_scale=4.0, height=64, width=96,
                              num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(5)).images[0],
                          dtype=np.int16)
    ours = picture(QwenImagePipeline.from_pretrained(folder, device="cuda"))
    assert np.abs(ours - expected).max() <= 1


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_on_the_gpu_gives_the_same_picture_and_frees_the_device(tiny_qwen, offload):
    folder, _ = tiny_qwen
    base = picture(QwenImagePipeline.from_pretrained(folder, device="cuda"))
    pipe = QwenImagePipeline.from_pretrained(folder, device="cuda", offload=offload)
    assert np.array_equal(picture(pipe), base)
    # after the call the DiT waits in CPU memory (model: the VAE was the last model moved; sequential: always)
    assert next(pipe.dit.parameters()).device.type == "cpu"


def test_bf16_picture_is_close_to_fp32(tiny_qwen):
    folder, _ = tiny_qwen
    fp32 = picture(QwenImagePipeline.from_pretrained(folder, device="cuda"))
    bf16 = picture(QwenImagePipeline.from_pretrained(folder, device="cuda", torch_dtype="bf16"))
    assert np.abs(fp32 - bf16).mean() < 8  # bf16 rounding through 3 steps of a random model


def test_bf16_training_step_on_the_gpu(tiny_qwen, tmp_path):
    from test_training import config, losses, make_dataset

    from diffusmith.training.runner import train

    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    train(config(tiny_qwen[0], data, out, device="cuda", mixed_precision="bf16", gradient_checkpointing=True,
                 max_steps=3, save_every=2))
    assert len(losses(out)) == 3 and all(np.isfinite(losses(out)))
    assert (out / "lora.safetensors").exists()
