"""Selective gradient checkpointing: the gradients of no checkpointing, with less kept for backward."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from common import PeakMemory
from test_memory import lora_dit as memory_lora_dit

from diffusmith.core.checkpointing import (
    check_checkpointing_interval,
    checkpoints_block,
    gradient_checkpoint_forward,
    is_widening_product,
    save_expensive_ops_policy,
)
from diffusmith.models.qwen_image.dit import PRESETS, QwenImageDiT
from diffusmith.pipelines.qwen_image import model_fn_qwen_image

TINY3 = dataclasses.replace(PRESETS["tiny"], num_layers=3)
MODES = {  # name: model_fn keywords
    "none": {},
    "full": {"use_gradient_checkpointing": True},
    "selective": {"use_gradient_checkpointing": True, "gradient_checkpointing_mode": "selective"},
    "selective+offload": {"use_gradient_checkpointing_offload": True, "gradient_checkpointing_mode": "selective"},
}


def lora_dit(dtype: torch.dtype = torch.float32, num_layers: int = 3) -> QwenImageDiT:
    """Frozen tiny DiT with a rank-4 LoRA whose B is not zero, so that every LoRA weight gets a gradient."""
    return memory_lora_dit(dataclasses.replace(TINY3, num_layers=num_layers), dtype)


def inputs(h: int = 8, text_len: int = 5):
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 16, h, h, generator=g)
    text = torch.randn(2, text_len, TINY3.joint_attention_dim, generator=g)
    return {"latents": latents, "timestep": torch.tensor([700.0, 200.0]), "prompt_emb": text}


def allocator_trace(fn) -> tuple[object, int, int]:
    """``(fn(), net, peak)``: bytes of torch CPU memory that ``fn()`` allocated and had not freed when it
    returned, and the peak of that running sum (exact: the benchmarks' trace of the profiler's allocator
    events, which leaves out frees of memory allocated before the window)."""
    with PeakMemory("cpu") as memory:
        out = fn()
    return out, memory.net, memory.delta


def allocated_during(fn) -> tuple[object, int]:
    """``fn()`` and the bytes it allocated and had not freed when it returned: after a forward pass, what
    autograd and checkpointing keep for backward, plus the output."""
    out, net, _ = allocator_trace(fn)
    return out, net


@pytest.mark.parametrize("mode", ["full", "selective", "selective+offload"])
def test_lora_gradients_equal_no_checkpointing(mode):
    model = lora_dit()
    grads = {}
    for name in ("none", mode):
        loss = model_fn_qwen_image(model, **inputs(), **MODES[name]).pow(2).mean()
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
    assert grads[mode].keys() == grads["none"].keys() and len(grads["none"]) > 0
    for name, grad in grads[mode].items():
        torch.testing.assert_close(grad, grads["none"][name], rtol=1e-5, atol=1e-7, msg=name)


def test_selective_keeps_less_than_no_checkpointing_and_more_than_full():
    model = lora_dit(num_layers=8)  # the last block is not checkpointed: enough blocks to see the others
    kept = {}
    for name in ("none", "full", "selective"):
        out, kept[name] = allocated_during(lambda n=name: model_fn_qwen_image(model, **inputs(h=16), **MODES[n]))
        out.pow(2).mean().backward()  # the kept tensors are used, and then freed
        model.zero_grad(set_to_none=True)
    # what a tiny block keeps is mostly elementwise work (rotary, GELU, modulation): selective drops most of
    # it in the 7 checkpointed blocks (measured: 0.45x in all)
    assert kept["selective"] < 0.6 * kept["none"], kept
    assert kept["selective"] > kept["full"], kept  # the products' outputs are kept, not recomputed


def test_selective_keeps_the_products_and_recomputes_the_rest():
    calls = []

    def block(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        h = torch.tanh(x @ w)  # square product: kept
        return h + (h @ a) @ b  # LoRA-like down (kept) and up (widening: recomputed) projections

    x = torch.randn(64, 32, requires_grad=True)
    w, a, b = torch.randn(32, 32), torch.randn(32, 2, requires_grad=True), torch.randn(2, 32, requires_grad=True)
    out = gradient_checkpoint_forward(block, True, False, x, w, a, b, gradient_checkpointing_mode="selective")
    expected = torch.autograd.grad(block(x, w, a, b).sum(), (x, a, b))
    assert torch.allclose(out, block(x, w, a, b))
    calls.clear()
    got = torch.autograd.grad(out.sum(), (x, a, b))
    assert calls == [True]  # the block ran again, for the elementwise ops and the up-projection
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    assert not is_widening_product(w) and not is_widening_product(a) and is_widening_product(b)
    assert is_widening_product(torch.empty(32, 128)) and not is_widening_product(torch.empty(128, 32))
    assert save_expensive_ops_policy(None, torch.ops.aten.mm.default, x, w).name == "MUST_SAVE"
    assert save_expensive_ops_policy(None, torch.ops.aten.mm.default, x, b).name == "PREFER_RECOMPUTE"
    assert save_expensive_ops_policy(None, torch.ops.aten.tanh.default, x).name == "PREFER_RECOMPUTE"


def peak_during(fn) -> int:
    """Peak bytes of torch CPU memory above the level at the start of ``fn()``."""
    return allocator_trace(fn)[2]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_the_last_block_is_not_checkpointed_and_that_costs_no_memory(mode, monkeypatch):
    import diffusmith.models.qwen_image.dit as dit

    assert [checkpoints_block(i, 3) for i in range(3)] == [True, True, False]
    model = lora_dit(num_layers=3)
    runs = []
    for block in model.transformer_blocks:
        block.register_forward_pre_hook(lambda m, _: runs.append(torch.is_grad_enabled()))

    def step():
        model_fn_qwen_image(model, **inputs(h=16), **MODES[mode]).pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: first-call allocations (rotary tables, caches) out of the measured steps
    runs.clear()
    peak = peak_during(step)
    assert len(runs) == 5  # 3 blocks forward; blocks 0 and 1 again in backward, block 2 not
    monkeypatch.setattr(dit, "checkpoints_block", lambda index, num_blocks, interval=1: True)  # every block
    runs.clear()
    peak_every_block = peak_during(step)
    assert len(runs) == 6
    # the last block's recomputation would come first in backward, when everything else is still kept, so
    # keeping its activations instead adds only the head's backward transients (norm_out, proj_out) to the
    # peak: 3-6 % here (measured), where one block's activations are about 60 % of the peak
    assert peak <= peak_every_block * 1.15, (peak, peak_every_block)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_an_interval_checkpoints_every_nth_block_with_the_same_gradients(mode):
    assert [checkpoints_block(i, 7, 2) for i in range(7)] == [True, False, True, False, True, False, False]
    assert [checkpoints_block(i, 7, 3) for i in range(7)] == [True, False, False, True, False, False, False]
    assert [checkpoints_block(i, 3, 5) for i in range(3)] == [True, False, False]
    model = lora_dit(num_layers=6)
    reruns = []
    for index, block in enumerate(model.transformer_blocks):
        block.register_forward_pre_hook(lambda m, _, i=index: reruns.append(i))
    grads, kept = {}, {}
    for interval in (None, 1, 2):
        flags = {} if interval is None else {**MODES[mode], "gradient_checkpointing_interval": interval}
        out, kept[interval] = allocated_during(lambda f=flags: model_fn_qwen_image(model, **inputs(h=16), **f))
        reruns.clear()
        out.pow(2).mean().backward()
        grads[interval] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        assert reruns == {None: [], 1: [4, 3, 2, 1, 0], 2: [4, 2, 0]}[interval]  # recomputed in backward
    for name, grad in grads[2].items():
        torch.testing.assert_close(grad, grads[None][name], rtol=1e-5, atol=1e-7, msg=name)
    # half of the five blocks that can be checkpointed keep their activations
    assert kept[1] < kept[2] < kept[None], kept


def test_an_interval_must_be_a_positive_integer():
    assert check_checkpointing_interval(3) == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="gradient_checkpointing_interval must be a positive integer"):
            check_checkpointing_interval(bad)
    with pytest.raises(ValueError, match="gradient_checkpointing_interval"):
        model_fn_qwen_image(lora_dit(num_layers=2), **inputs(), use_gradient_checkpointing=True,
                            gradient_checkpointing_interval=0)
    from diffusmith import DiffusmithError
    from diffusmith.training.runner import TrainConfig

    config = TrainConfig(model="m", dataset="d", output="o", max_steps=1, gradient_checkpointing=True,
                         gradient_checkpointing_interval=0)
    with pytest.raises(DiffusmithError, match="^--gradient-checkpointing-interval must be a positive integer, got 0$"):
        config.check()


def test_unknown_mode_is_refused_and_no_grad_is_a_plain_call():
    with pytest.raises(ValueError, match="gradient_checkpointing_mode"):
        gradient_checkpoint_forward(torch.tanh, True, False, torch.ones(2), gradient_checkpointing_mode="some")
    with torch.no_grad():
        out = gradient_checkpoint_forward(torch.tanh, True, False, torch.ones(2, requires_grad=True),
                                          gradient_checkpointing_mode="selective")
    assert not out.requires_grad


def test_selective_under_bf16_autocast_matches_no_checkpointing():
    model = lora_dit(torch.bfloat16)
    losses = {}
    for name in ("none", "selective"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model_fn_qwen_image(model, **inputs(), **MODES[name]).float().pow(2).mean()
        loss.backward()
        losses[name] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
    assert losses["selective"][0] == losses["none"][0]
    for name, grad in losses["selective"][1].items():
        torch.testing.assert_close(grad, losses["none"][1][name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------------------
# Norms recomputed in backward (every mode): same values and gradients as the plain functions, less kept
# ---------------------------------------------------------------------------------------------------------


def _values_and_grads(fn, *inputs, needs=None):
    needs = needs or [t.is_floating_point() for t in inputs]
    inputs = [t.detach().clone().requires_grad_(need) for t, need in zip(inputs, needs, strict=True)]
    out = fn(*inputs)
    out.float().mul(torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("dtype, weight_dtype, autocast", [
    (torch.float32, torch.float32, False),
    (torch.bfloat16, torch.bfloat16, False),
    (torch.bfloat16, torch.float32, True),
    (torch.float32, torch.bfloat16, False),
])
@pytest.mark.parametrize("weight_grad", [True, False])  # False: a frozen q/k norm under LoRA training
def test_rms_norm_module_equals_the_function(dtype, weight_dtype, autocast, weight_grad):
    from diffusmith.models.layers import RMSNorm, rms_norm

    norm = RMSNorm(16).to(weight_dtype)
    torch.nn.init.normal_(norm.weight)
    norm.weight.requires_grad_(weight_grad)
    x = torch.randn(2, 7, 3, 16).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain = _values_and_grads(lambda a, w: rms_norm(a, w, norm.eps), x, norm.weight, needs=(True, weight_grad))
        x_ours = x.clone().requires_grad_(True)
        out = norm(x_ours)
    out.float().mul(torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    assert torch.equal(out.detach(), plain[0])
    assert torch.equal(x_ours.grad, plain[1][0])
    if weight_grad:
        assert torch.equal(norm.weight.grad, plain[1][1])
    else:
        assert norm.weight.grad is None


@pytest.mark.parametrize("dtype, weight_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16), (torch.bfloat16, None),
])
@pytest.mark.parametrize("dim", [128, 3584])  # the q/k norms' head width, the prompt norm's
def test_rms_norm_is_the_references_bitwise(dtype, weight_dtype, dim):
    """Without autograd (inference) and in the keep-the-input Function (training), the values are diffusers'
    RMSNorm's, bit for bit, in every dtype pairing of activations and weight."""
    from diffusers.models.normalization import RMSNorm as ReferenceRMSNorm

    from diffusmith.models.layers import rms_norm, rms_norm_keeping_input

    g = torch.Generator().manual_seed(dim)
    x = (torch.randn(3, 37, 2, dim, generator=g) * 3).to(dtype)
    reference = ReferenceRMSNorm(dim, eps=1e-6, elementwise_affine=weight_dtype is not None)
    if weight_dtype is not None:
        reference.weight.data = (torch.rand(dim, generator=g) + 0.5).to(weight_dtype)
    weight = None if weight_dtype is None else reference.weight.detach()
    with torch.no_grad():
        # diffusers keeps a float32 weight's product in float32; diffusmith rounds it to x's dtype once
        expected = reference(x).to(dtype if weight_dtype in (None, torch.float32) else weight_dtype)
        assert torch.equal(rms_norm(x, weight, 1e-6), expected)
    out = rms_norm_keeping_input(x.clone().requires_grad_(True), weight, 1e-6)
    assert out.grad_fn is not None and torch.equal(out.detach(), expected)


@pytest.mark.parametrize("dtype, mod_dtype, autocast", [
    (torch.float32, torch.float32, False),
    (torch.bfloat16, torch.bfloat16, False),
    (torch.float32, torch.float32, True),
    (torch.bfloat16, torch.bfloat16, True),
    (torch.float32, torch.bfloat16, False),  # CUDA autocast's case: a float32 norm, bf16 shift and scale
])
@pytest.mark.parametrize("x_grad", [True, False])  # e.g. the text entering the first block: no gradient
def test_norm_modulate_keeping_input_equals_the_plain_call(dtype, mod_dtype, autocast, x_grad):
    from diffusmith.models.layers import norm_modulate, norm_modulate_keeping_input

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 32, generator=g).to(dtype)
    shift, scale = (torch.randn(2, 32, generator=g).to(mod_dtype) for _ in range(2))
    fn = functools.partial(norm_modulate, eps=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = _values_and_grads(lambda *t: norm_modulate_keeping_input(*t, eps=1e-6), x, shift, scale,
                                 needs=(x_grad, True, True))
        plain = _values_and_grads(fn, x, shift, scale, needs=(x_grad, True, True))
    assert ours[0].dtype == plain[0].dtype and torch.equal(ours[0], plain[0])
    for got, expected in zip(ours[1], plain[1], strict=True):
        assert (got is None and expected is None) or torch.equal(got, expected)


def test_norm_modulate_keeps_only_its_input():
    from diffusmith.models.layers import norm_modulate, norm_modulate_keeping_input

    x = torch.randn(4, 256, 64, requires_grad=True)
    shift, scale = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64, requires_grad=True)
    fn = functools.partial(norm_modulate, eps=1e-6)
    plain_out, plain = allocated_during(lambda: fn(x, shift, scale))
    ours_out, ours = allocated_during(lambda: norm_modulate_keeping_input(x, shift, scale, 1e-6))
    # plain: the output and the norm's output (kept for the product with scale); ours: the output only
    out_bytes = x.numel() * x.element_size()
    assert plain >= 2 * out_bytes and ours < 1.1 * out_bytes, (plain, ours)
    with torch.no_grad():
        assert not norm_modulate_keeping_input(x, shift, scale, 1e-6).requires_grad


def test_selective_with_compiled_blocks_gives_the_same_gradients():
    from diffusmith.core.memory import compile_repeated_blocks

    reference, compiled = lora_dit(), lora_dit()
    compile_repeated_blocks(compiled, backend="eager")  # the plumbing; inductor would build kernels
    grads = []
    for model, mode in ((reference, "none"), (compiled, "selective")):
        model_fn_qwen_image(model, **inputs(), **MODES[mode]).pow(2).mean().backward()
        grads.append({n.replace("_orig_mod.", ""): p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[1].items():
        torch.testing.assert_close(grad, grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
