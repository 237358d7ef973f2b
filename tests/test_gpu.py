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
    pipe = QwenImagePipeline.from_pretrained(folder, device="cuda", offload=offload)
    # streamed, the CFG sides run as one batch by default: compare with the same computation
    base = picture(QwenImagePipeline.from_pretrained(folder, device="cuda"), batch_cfg=pipe.batches_cfg())
    assert np.abs(picture(pipe) - base).max() <= (0 if offload == "model" else 1)
    # after the call the DiT's blocks wait in CPU memory (model: the VAE was the last model moved; sequential:
    # always, pinned, while the few modules outside the blocks stay on the device)
    assert {p.device.type for p in pipe.dit.transformer_blocks.parameters()} == {"cpu"}
    if offload == "sequential":
        assert all(p.is_pinned() for p in pipe.dit.transformer_blocks.parameters())


def test_batched_cfg_on_the_gpu_gives_the_picture_of_two_predictions(tiny_qwen):
    """One batch of two with the shorter negative prompt padded and masked (SDPA's masked kernel on CUDA)."""
    folder, _ = tiny_qwen
    pipe = QwenImagePipeline.from_pretrained(folder, device="cuda")
    assert np.abs(picture(pipe, batch_cfg=True) - picture(pipe, batch_cfg=False)).max() <= 1


def test_fp8_block_swap_on_the_gpu_gives_the_resident_fp8_picture(tiny_qwen):
    """generate --fp8 --block-swap 1: fp8 blocks streamed from pinned memory on the side stream."""
    folder, _ = tiny_qwen
    resident = picture(QwenImagePipeline.from_pretrained(folder, device="cuda", fp8=True), batch_cfg=True)
    pipe = QwenImagePipeline.from_pretrained(folder, device="cuda", fp8=True, block_swap=1)
    assert np.abs(picture(pipe) - resident).max() <= 1
    streamed = pipe.dit.transformer_blocks[0]
    assert all(p.device.type == "cpu" and p.is_pinned() for p in streamed.parameters())
    assert all(p.device.type == "cuda" for p in pipe.dit.transformer_blocks[-1].parameters())


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


def test_norms_keeping_inputs_equal_the_plain_calls_under_cuda_autocast():
    """Under CUDA autocast the LayerNorm runs in float32 while the modulation is bf16 (CPU autocast keeps the
    norm in bf16): the hand-written backward must follow autograd's dtypes there too."""
    from diffusmith.models.layers import norm_modulate, norm_modulate_keeping_input, rms_norm, rms_norm_keeping_input

    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(2, 9, 64, device="cuda", generator=g).bfloat16()
    shift, scale = (torch.randn(2, 64, device="cuda", generator=g).bfloat16() for _ in range(2))
    weight = torch.randn(64, device="cuda", generator=g).bfloat16()
    cases = [(norm_modulate_keeping_input, norm_modulate, (x, shift, scale)),
             (rms_norm_keeping_input, rms_norm, (x, weight))]
    for ours_fn, plain_fn, inputs in cases:
        results = []
        for fn in (ours_fn, plain_fn):
            leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fn(*leaves, 1e-6)
            out.float().mul(torch.linspace(-1, 1, out.numel(), device="cuda").reshape(out.shape)).sum().backward()
            results.append((out.detach(), [t.grad for t in leaves]))
        (ours_out, ours_grads), (plain_out, plain_grads) = results
        assert ours_out.dtype == plain_out.dtype and torch.equal(ours_out, plain_out)
        assert all(torch.equal(a, b) for a, b in zip(ours_grads, plain_grads, strict=True))


@pytest.mark.parametrize("backend", ["auto", "cudnn", "flash", "efficient", "math"])
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_attention_backends_compute_attention_in_bf16(backend, masked):
    """--attention-backend on CUDA: each kernel (or its fallback, e.g. flash takes no mask) against float64."""
    from diffusmith.core.attention import attention, set_attention_backend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 128, generator=g).cuda().bfloat16().requires_grad_() for _ in range(3))
    mask = None
    if masked:
        mask = torch.ones(2, 300, dtype=torch.bool, device="cuda")
        mask[1, 200:] = False
    set_attention_backend(backend)
    try:
        out = attention(q, k, v, mask)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    finally:
        set_attention_backend("auto")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = q64 @ k64.transpose(-1, -2) / 128**0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    expected = scores.softmax(-1) @ v64
    expected_grads = torch.autograd.grad(expected.square().sum(), (q64, k64, v64))
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=5e-2, rtol=5e-2)


@pytest.fixture
def cuda_graphs_or_error():
    """A block that cannot become a CUDA graph raises, with torch's reason, instead of running without."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"triton.cudagraph_or_error": True}):
        yield


def _cuda_graphs_recorded() -> bool:
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    return manager is not None and any(manager.roots.values())


@pytest.mark.parametrize("accumulation", [1, 2])
def test_cuda_graph_training_matches_eager(tiny_qwen, tmp_path, accumulation, cuda_graphs_or_error):
    """train --compile-mode reduce-overhead: the blocks replay as CUDA graphs (none skipped), with the
    gradients backward leaves in the graphs' memory (1) or added into kept buffers (2), and validation
    sampling between steps (inference graphs in the same tree), giving the losses and weights of the eager
    run (up to inductor's float32 rounding; the second case reuses the first one's compiled code)."""
    from safetensors.torch import load_file
    from test_training import config, losses, make_dataset
    from torch._dynamo.utils import counters

    from diffusmith.training.runner import train

    data = make_dataset(tmp_path / "data")
    runs = {}
    skips = counters["inductor"]["cudagraph_skips"]
    for mode in (None, "reduce-overhead"):
        out = tmp_path / str(mode)
        train(config(tiny_qwen[0], data, out, device="cuda", compile_mode=mode, max_steps=3,
                     gradient_accumulation=accumulation, validation_prompts=("a red circle",), validate_every=2,
                     validation_steps=2))
        runs[mode] = (losses(out), load_file(out / "lora.safetensors"))
    assert counters["inductor"]["cudagraph_skips"] == skips and _cuda_graphs_recorded()
    (eager_losses, eager), (graphed_losses, graphed) = runs[None], runs["reduce-overhead"]
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-6)
    assert max((eager[k] - graphed[k]).abs().max().item() for k in eager) <= 1e-4


def test_cuda_graph_sampling_gives_the_plain_picture(tiny_qwen, cuda_graphs_or_error):
    """generate --compile-mode reduce-overhead: two DiT calls per step (true CFG) and a second picture size
    replay as CUDA graphs with the picture of the uncompiled pipeline."""
    from torch._dynamo.utils import counters

    folder, _ = tiny_qwen
    plain = QwenImagePipeline.from_pretrained(folder, device="cuda")
    graphed = QwenImagePipeline.from_pretrained(folder, device="cuda")
    graphed.compile(mode="reduce-overhead")
    skips = counters["inductor"]["cudagraph_skips"]
    for size in ({"height": 64, "width": 96}, {"height": 96, "width": 64}):
        assert np.abs(picture(graphed, **size) - picture(plain, **size)).max() <= 1
    assert counters["inductor"]["cudagraph_skips"] == skips and _cuda_graphs_recorded()
