"""Training memory modes (block swap, fp8 storage of frozen weights, compiled blocks): each gives the result
the model gives without it."""

from __future__ import annotations

import dataclasses
import functools
import weakref

import pytest
import torch
from test_training import config, losses, make_dataset

from diffusmith import DiffusmithError, QwenImagePipeline
from diffusmith.cli import main
from diffusmith.core import block_swap, compilation, memory
from diffusmith.core.lora import inject_lora
from diffusmith.core.memory import (
    BlockSwap,
    Fp8Linear,
    compile_repeated_blocks,
    enable_block_swap,
    enable_fp8_storage,
)
from diffusmith.models.qwen_image.dit import PRESETS, QwenImageDiT
from diffusmith.training.module import LossSpec, TrainableSpec, TrainingModule
from diffusmith.training.runner import train

TINY3 = dataclasses.replace(PRESETS["tiny"], num_layers=3)


def lora_dit(cfg=TINY3, dtype=torch.float32) -> QwenImageDiT:
    """A tiny random DiT with a LoRA whose B is not zero (so every LoRA weight gets a gradient)."""
    torch.manual_seed(0)
    model = QwenImageDiT(cfg).to(dtype).requires_grad_(False)
    inject_lora(model, model.default_lora_targets, rank=4, exclude=model.modules_without_gradient())
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    return model


def inputs(batch=2):
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(batch, 16, 8, 8, generator=g)
    text = torch.randn(batch, 5, 32, generator=g)
    return latents, torch.tensor([700.0, 200.0][:batch]), text


def loss_and_grads(model, checkpointing=False, model_inputs=None):
    latents, t, text = model_inputs or inputs()
    for p in model.parameters():
        p.grad = None
    out = model(latents, t, text, use_gradient_checkpointing=checkpointing)
    loss = out.float().pow(2).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def learns(grads: dict) -> bool:
    """Every LoRA weight gets a gradient, except the last block's text queries: they only make the text
    stream's output, which the model drops (their gradient is exactly zero)."""
    return all(g.abs().max().item() > 0 for n, g in grads.items() if "blocks.2.attn.add_q_proj" not in n)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


# ---- block swap --------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("blocks_on_device", [0, 1])
def test_block_swap_gives_the_same_loss_and_lora_gradients(blocks_on_device, checkpointing):
    loss_ref, grads_ref = loss_and_grads(lora_dit(), checkpointing)

    model = lora_dit()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    swap = enable_block_swap(model, "cpu", blocks_on_device)
    where = {n: p.data_ptr() for n, p in trainable.items()}
    loss, grads = loss_and_grads(model, checkpointing)

    assert loss == pytest.approx(loss_ref, abs=1e-6)
    assert max_diff(grads, grads_ref) <= 1e-6
    assert learns(grads)
    assert {n: p.data_ptr() for n, p in trainable.items()} == where  # trainable weights never move
    assert sorted(swap.blocks) == list(range(3 - blocks_on_device))
    assert all(not t.requires_grad for t in swap.swapped_tensors)
    forward_copies = len(swap.blocks)
    if checkpointing:  # the recomputed forward fetched every checkpointed swapped block again (all but the last)
        recomputed = [i for i in swap.blocks if i < 2]
        assert swap.stats["fetches"] + swap.stats["prefetches"] == forward_copies + len(recomputed)
        # the last block is not checkpointed: backward copies the weights autograd saved for it again
        assert (swap.stats["backward_fetches"] > 0) == (2 in swap.blocks)
    else:  # the weights autograd saved were not kept: backward copied them again
        assert swap.stats["fetches"] + swap.stats["prefetches"] == forward_copies
        assert swap.stats["backward_fetches"] > 0


def test_block_swap_keeps_no_device_copy_past_its_block(monkeypatch):
    made: list[weakref.ref] = []
    original = BlockSwap._copy

    def recording(self, block, stream):
        copies, event = original(self, block, stream)
        made.extend(weakref.ref(c) for c in copies)
        return copies, event

    monkeypatch.setattr(BlockSwap, "_copy", recording)
    model = lora_dit()
    swap = enable_block_swap(model, "cpu", 0)
    latents, t, text = inputs()
    loss = model(latents, t, text).pow(2).mean()  # the graph is alive, waiting for backward
    assert made and all(ref() is None for ref in made)  # on the CPU copies are real copies, so this can fail
    released = [t.data_ptr() == h.data_ptr() for b in swap.blocks.values()
                for t, h in zip(b.tensors, b.hosts, strict=True)]
    assert released and all(released)  # the parameters point at their host copies again
    loss.backward()
    assert swap.stats["backward_fetches"] > 0


class RecordActivations(torch.overrides.TorchFunctionMode):
    """Weak references to every tensor made inside the autograd graph while the mode is on."""

    def __init__(self):
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                self.refs.append(weakref.ref(t))
        return out


def test_block_swap_frees_a_graph_dropped_without_backward():
    model = lora_dit()
    enable_block_swap(model, "cpu", 1)
    with RecordActivations() as record:
        loss = model(*inputs()).pow(2).mean()
    assert len(record.refs) > 100
    del loss  # e.g. a step given up: its activations must go at once, with no reference cycle left behind
    assert [ref() for ref in record.refs if ref() is not None] == []


def test_block_swap_inference_through_the_same_model():
    reference = lora_dit().eval()
    model = lora_dit().eval()
    swap = enable_block_swap(model, "cpu", 1)
    with torch.no_grad():
        expected = reference(*inputs())
        assert torch.equal(model(*inputs()), expected)
    with torch.inference_mode():
        assert torch.equal(model(*inputs()), expected)
    loss_and_grads(model)  # copies made under inference mode do not leak into training
    assert swap.stats["fetches"] + swap.stats["prefetches"] == 3 * len(swap.blocks)


def test_block_swap_with_every_block_on_the_device_swaps_nothing():
    swap = enable_block_swap(lora_dit(), "cpu", 5)
    assert swap.blocks == {} and swap.swapped_tensors == []


def test_block_swap_refuses_full_training_and_bad_input():
    model = QwenImageDiT(TINY3)  # every weight trains
    with pytest.raises(DiffusmithError, match="does not work with --full"):
        enable_block_swap(model, "cpu", 1)
    with pytest.raises(DiffusmithError, match=">= 0"):
        enable_block_swap(lora_dit(), "cpu", -1)
    with pytest.raises(DiffusmithError, match="repeated blocks"):
        enable_block_swap(torch.nn.Linear(2, 2).requires_grad_(False), "cpu", 0)


def training_batch(tmp_path):
    from diffusmith.training.data import collate_samples, load_dataset

    data = make_dataset(tmp_path / "data")
    return collate_samples([load_dataset(data, height=64, width=64)[i] for i in range(2)])


def training_module(folder, checkpointing=False, **modes) -> TrainingModule:
    pipe = QwenImagePipeline.from_pretrained(folder)
    module = TrainingModule(pipe, TrainableSpec(rank=4), LossSpec(use_gradient_checkpointing=checkpointing))
    torch.manual_seed(0)
    for p in module.trainable_parameters().values():  # LoRA B starts at 0: make the gradients non-trivial
        torch.nn.init.normal_(p, std=0.1)
    if modes.get("fp8"):
        enable_fp8_storage(module.model)
    if "block_swap" in modes:
        enable_block_swap(module.model, "cpu", modes["block_swap"])
    if modes.get("compile"):
        compile_repeated_blocks(module.model, backend="eager")
    return module


def module_loss_and_grads(module, batch):
    torch.manual_seed(1)
    loss = module(batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in module.trainable_parameters().items()}


@pytest.mark.parametrize("modes", [{"block_swap": 0}, {"block_swap": 1, "checkpointing": True}])
def test_training_module_loss_is_unchanged(tiny_qwen, tmp_path, modes):
    batch = training_batch(tmp_path)
    loss_ref, grads_ref = module_loss_and_grads(training_module(tiny_qwen[0], modes.get("checkpointing", False)),
                                                batch)
    module = training_module(tiny_qwen[0], **modes)
    keys = list(module.model.state_dict())
    loss, grads = module_loss_and_grads(module, batch)
    assert loss == pytest.approx(loss_ref, abs=1e-6)
    assert max_diff(grads, grads_ref) <= 1e-6
    assert list(module.model.state_dict()) == keys


# ---- fp8 storage ---------------------------------------------------------------------------------------


def test_fp8_linear_is_the_linear_of_its_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 24)
    linear.weight.requires_grad_(False)
    fp8 = Fp8Linear(linear, torch.float8_e4m3fn)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.bias is linear.bias
    dequantized = fp8.weight.float() * fp8.weight_scale[:, None]
    # per-row scaling uses fp8's full range: e4m3 keeps 3 mantissa bits, a relative error of at most 2**-4
    assert ((dequantized - linear.weight).abs() <= linear.weight.abs() / 16 + 1e-12).all()
    assert "weight_scale" not in fp8.state_dict()

    x = torch.randn(2, 5, 48, requires_grad=True)
    out = fp8(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref_bias = linear.bias.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(ref_x, dequantized, ref_bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(linear.bias.grad, ref_bias.grad, rtol=1e-5, atol=1e-6)
    assert fp8(x.to(torch.bfloat16)).dtype == torch.bfloat16  # computes in the input's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8(x).dtype == torch.bfloat16


def test_fp8_linear_add_merges_a_delta_in_place_at_fp8_precision():
    """A LoRA merged into an fp8 layer: the sum of the dequantized weight and the delta, quantized again with
    new row scales, in the same tensors (what offload hooks point at)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 24)
    linear.weight.requires_grad_(False)
    fp8 = Fp8Linear(linear, torch.float8_e4m3fn)
    weight, scale = fp8.weight, fp8.weight_scale
    before = fp8.dequantized_weight()
    delta = torch.randn(24, 48) * 0.5  # large enough to change the rows' ranges, hence their scales
    fp8.add_(delta)
    assert fp8.weight is weight and fp8.weight_scale is scale and fp8.weight.dtype == torch.float8_e4m3fn
    expected = before + delta
    assert ((fp8.dequantized_weight() - expected).abs() <= expected.abs() / 16 + 1e-12).all()
    assert not torch.equal(fp8.weight_scale, Fp8Linear(linear, torch.float8_e4m3fn).weight_scale)
    fp8.add_(-delta)  # taking it out again: back to the first weight up to the two roundings (each <= 1/16)
    first = expected.abs() / 16
    assert ((fp8.dequantized_weight() - before).abs() <= first + (before.abs() + first) / 16 + 1e-12).all()


def test_fp8_storage_keeps_the_loss_close_and_trains_the_lora():
    loss_ref, grads_ref = loss_and_grads(lora_dit())
    model = lora_dit()
    lora_before = {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters() if p.requires_grad}
    converted = enable_fp8_storage(model)
    loss, grads = loss_and_grads(model)

    # peft layers: the frozen base layer is converted, the LoRA weights are untouched fp32 parameters
    assert "transformer_blocks.0.attn.to_q.base_layer" in converted
    assert "transformer_blocks.2.attn.to_add_out" in converted  # frozen, no LoRA
    assert not any("lora_" in n for n in converted)
    assert {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters() if p.requires_grad} == lora_before
    assert all(isinstance(model.get_submodule(n), Fp8Linear) for n in converted)
    # e4m3 keeps 3 mantissa bits: each weight is off by up to 1/16 of itself (about 3.6% rms), which
    # averages out over a layer's inputs. Measured here: |d loss| / loss = 2.2e-4, and the LoRA gradient
    # (all of it as one vector) is off by 3.0% of its norm (cosine 0.9996). Bounds: about 5x and 2x that.
    assert loss == pytest.approx(loss_ref, rel=1e-3)
    flat, flat_ref = (torch.cat([g[n].flatten() for n in grads_ref]) for g in (grads, grads_ref))
    assert (flat - flat_ref).norm() <= 0.06 * flat_ref.norm()
    assert learns(grads)


def block_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for b in model.transformer_blocks
               for t in [*b.parameters(), *b.buffers()])


def test_fp8_storage_halves_the_block_weights_of_bf16():
    wide = dataclasses.replace(PRESETS["tiny"], attention_head_dim=32, num_attention_heads=8,
                               axes_dims_rope=(8, 12, 12))  # width 256
    model = QwenImageDiT(wide).to(torch.bfloat16).requires_grad_(False)
    bf16 = block_bytes(model)
    enable_fp8_storage(model)
    ratio = block_bytes(model) / bf16
    # fp8 weights + one fp32 scale per output row (4 / in_features bytes per weight); biases and norms stay bf16
    assert 0.5 < ratio < 0.53, ratio


def test_fp8_storage_skip_and_errors(monkeypatch):
    model = lora_dit()
    converted = enable_fp8_storage(model, skip=("img_mod.1", "txt_mod.1", "transformer_blocks.1"))
    assert not any(".img_mod." in n or ".txt_mod." in n or n.startswith("transformer_blocks.1.") for n in converted)
    assert isinstance(model.transformer_blocks[0].img_mod[1].base_layer, torch.nn.Linear)

    with pytest.raises(DiffusmithError, match="no frozen Linear"):
        enable_fp8_storage(QwenImageDiT(TINY3))  # full fine-tuning: nothing is frozen
    with pytest.raises(DiffusmithError, match="float8 dtype"):
        enable_fp8_storage(lora_dit(), dtype=torch.bfloat16)
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(DiffusmithError, match="no float8 dtypes"):
        enable_fp8_storage(lora_dit())


def test_fp8_storage_with_block_swap_and_checkpointing():
    fp8 = lora_dit()
    enable_fp8_storage(fp8)
    loss_ref, grads_ref = loss_and_grads(fp8)
    for checkpointing in (False, True):
        model = lora_dit()
        enable_fp8_storage(model)
        swap = enable_block_swap(model, "cpu", 1)
        assert all(t.dtype in (torch.float8_e4m3fn, torch.float32) for t in swap.swapped_tensors)
        loss, grads = loss_and_grads(model, checkpointing)
        assert loss == pytest.approx(loss_ref, abs=1e-6)
        assert max_diff(grads, grads_ref) <= 1e-6
        # what autograd saved of the fp8 layers is the fp8 weight itself, held as a host reference
        assert (swap.stats["backward_fetches"] > 0) != checkpointing


# ---- compile ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_give_the_same_loss_and_keep_the_keys(checkpointing):
    loss_ref, grads_ref = loss_and_grads(lora_dit(), checkpointing)
    model = lora_dit()
    keys = list(model.state_dict())
    # fullgraph: a graph break inside a block (e.g. an autograd.Function dynamo cannot trace) is an error,
    # since each break splits the block into pieces the compiler cannot fuse across
    compile_repeated_blocks(model, backend="eager", fullgraph=True)
    assert list(model.state_dict()) == keys
    loss, grads = loss_and_grads(model, checkpointing)
    assert loss == pytest.approx(loss_ref, abs=1e-6)
    assert max_diff(grads, grads_ref) <= 1e-6
    with pytest.raises(DiffusmithError, match="already compiled"):
        compile_repeated_blocks(model, backend="eager")


def test_compiled_blocks_serve_new_sizes_without_recompiling_each():
    """Caption lengths and buckets vary from step to step: after a second size torch makes one graph with
    dynamic sizes that serves the rest, instead of one graph per size. Checkpointed blocks alternate between
    the graphs with the same gradients as the uncompiled model."""
    graphs = []

    def recording_backend(graph, example_inputs):
        graphs.append(any(isinstance(x, torch.SymInt) for x in example_inputs))
        return graph.forward

    torch._dynamo.reset()  # forget the sizes earlier tests showed the block's code
    compiled, plain = lora_dit(), lora_dit()
    compile_repeated_blocks(compiled, backend=recording_backend)
    g = torch.Generator().manual_seed(0)
    counts = []
    for text_len in (5, 6, 7, 8, 5):
        sample = (torch.randn(2, 16, 8, 8, generator=g), torch.tensor([700.0, 200.0]),
                  torch.randn(2, text_len, 32, generator=g))
        _, grads = loss_and_grads(compiled, checkpointing=True, model_inputs=sample)
        _, expected = loss_and_grads(plain, checkpointing=True, model_inputs=sample)
        assert max_diff(grads, expected) <= 1e-6
        counts.append(len(graphs))
    # block variants (the first block's inputs need no gradient, the last skips its text stream): a static
    # graph each for the first size, a dynamic one each for the second, nothing new after that
    assert counts[1] == 2 * counts[0] and counts[2:] == [counts[1]] * 3
    assert not any(graphs[:counts[0]]) and all(graphs[counts[0]:])
    # past torch's default of 8 graphs per code a checkpointed block's recomputation would run eagerly
    # while its forward ran compiled (CheckpointError): compiling raises the limit
    assert torch._dynamo.config.recompile_limit >= compilation.RECOMPILE_LIMIT


def test_compile_failures_are_clear(monkeypatch):
    with pytest.raises(DiffusmithError, match="torch.compile refused"):
        compile_repeated_blocks(lora_dit(), backend="no-such-backend")

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    model = lora_dit()
    compile_repeated_blocks(model, backend=broken_backend)
    with pytest.raises(DiffusmithError, match=r"torch.compile failed on transformer_blocks\.0.*leave out --compile"):
        model(*inputs())
    monkeypatch.delattr(torch, "compile")
    with pytest.raises(DiffusmithError, match="no torch.compile"):
        compile_repeated_blocks(lora_dit())


def test_cuda_graph_modes_mark_each_step(monkeypatch):
    """With a CUDA-graph mode each step (a training loss, a denoising step) tells torch it begins: no block
    calls the next inside a compiled region, so torch would otherwise take each block's call for a new step
    and reuse the memory of the outputs the next block reads. Other modes leave torch's heuristic alone."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    plain = lora_dit()
    compile_repeated_blocks(plain, backend="eager", mode="max-autotune-no-cudagraphs")
    assert not memory.uses_cuda_graphs(plain)
    memory.begin_step(plain)
    assert marks == []
    pipe = QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    torch.manual_seed(0)
    pipe.dit = QwenImageDiT(TINY3)
    module = TrainingModule(pipe, TrainableSpec(rank=4))
    compile_repeated_blocks(pipe.dit, backend="eager", mode="reduce-overhead")  # eager ignores the mode
    assert memory.uses_cuda_graphs(pipe.dit)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    module.loss_from_inputs({"input_latents": latents, "noise": torch.randn_like(latents)},
                            {"prompt_emb": text, "prompt_emb_mask": None}).backward()
    assert len(marks) == 1
    pipe.scheduler.set_timesteps(2, image_seq_len=16)
    with torch.no_grad():  # one true-CFG step: two DiT calls, one step
        pipe.guided_velocity({}, {"prompt_emb": text}, {"prompt_emb": text[:, :3]}, latents,
                             pipe.scheduler.timesteps[0], 4.0)
    assert len(marks) == 2


def test_cuda_graphs_refuse_moving_weights(tiny_qwen):
    with pytest.raises(DiffusmithError, match="unknown --compile-mode 'fast'"):
        compile_repeated_blocks(lora_dit(), backend="eager", mode="fast")
    model = lora_dit()
    model.proj_out.to("meta")  # weights on two devices
    with pytest.raises(DiffusmithError, match="need the whole model on the GPU"):
        compile_repeated_blocks(model, backend="eager", mode="reduce-overhead")
    streamed = QwenImagePipeline.from_pretrained(tiny_qwen[0], offload="model")
    with pytest.raises(DiffusmithError, match="not offload 'model'.*--compile-mode default"):
        streamed.compile(backend="eager", mode="reduce-overhead")
    streamed.compile(backend="eager", mode="default")  # no graphs: offload is fine


# ---- the training run ------------------------------------------------------------------------------------


@pytest.fixture
def eager_compile(monkeypatch):
    """--compile with the eager backend: the plumbing in seconds (inductor would build kernels)."""
    monkeypatch.setattr(memory, "compile_repeated_blocks",
                        functools.partial(compile_repeated_blocks, backend="eager"))


@pytest.fixture(scope="module")
def reference_run(tiny_qwen, tmp_path_factory):
    """(dataset, run folder) of a 2-step run without any memory mode."""
    folder = tmp_path_factory.mktemp("memory_reference")
    data = make_dataset(folder / "data")
    train(config(tiny_qwen[0], data, folder / "run", max_steps=2))
    return data, folder / "run"


@pytest.mark.parametrize("modes", [
    {"block_swap": 0},
    {"block_swap": 1, "gradient_checkpointing": True},
    {"fp8_base": True},
    {"compile": True},
])
def test_train_runs_with_each_mode(tiny_qwen, tmp_path, eager_compile, reference_run, modes):
    data, reference = reference_run
    out = tmp_path / "run"
    final = train(config(tiny_qwen[0], data, out, max_steps=2, **modes))
    assert final.exists()
    tolerance = 1e-3 if modes.get("fp8_base") else 1e-5  # fp8: see test_fp8_storage_keeps_the_loss_close
    assert losses(out) == pytest.approx(losses(reference), rel=tolerance, abs=1e-6)


def test_train_with_cuda_graph_mode_and_accumulation(tiny_qwen, tmp_path, eager_compile, monkeypatch):
    """--compile-mode reduce-overhead with gradient accumulation keeps one gradient buffer per weight for the
    whole run (a CUDA graph's gradient output is overwritten by the next micro-batch's replay), zeroed after
    each step: the same losses and weights as the plain run."""
    from safetensors.torch import load_file

    from diffusmith.training.distributed import DataParallel

    kept = []
    keep = DataParallel.keep_gradient_buffers
    monkeypatch.setattr(DataParallel, "keep_gradient_buffers", lambda self: (kept.append(1), keep(self)))
    data = make_dataset(tmp_path / "data")
    plain, graphed = tmp_path / "plain", tmp_path / "graphed"
    train(config(tiny_qwen[0], data, plain, max_steps=2, gradient_accumulation=2))
    assert kept == []
    train(config(tiny_qwen[0], data, graphed, max_steps=2, gradient_accumulation=2,
                 compile_mode="reduce-overhead"))
    assert kept == [1]
    assert losses(graphed) == pytest.approx(losses(plain), rel=1e-5, abs=1e-6)
    expected, got = load_file(plain / "lora.safetensors"), load_file(graphed / "lora.safetensors")
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6


@pytest.mark.parametrize("extra,match", [
    ({"compile_mode": "fastest"}, "unknown --compile-mode 'fastest'"),
    ({"compile_mode": "reduce-overhead", "block_swap": 1}, "does not work with --block-swap"),
    ({"compile_mode": "reduce-overhead", "gradient_checkpointing": True}, "with --gradient-checkpointing"),
])
def test_cuda_graph_mode_refuses_what_it_cannot_do(tiny_qwen, tmp_path, extra, match):
    with pytest.raises(DiffusmithError, match=match):
        config(tiny_qwen[0], tmp_path, tmp_path / "run", max_steps=1, **extra).check()


def test_train_flags_from_the_shell(tiny_qwen, tmp_path, capsys, eager_compile):
    data, out = make_dataset(tmp_path / "data"), tmp_path / "run"
    argv = ["train", "--model", str(tiny_qwen[0]), "--dataset", str(data), "--output", str(out), "--height", "64",
            "--width", "64", "--device", "cpu", "--lora-rank", "4", "--max-steps", "2"]
    assert main([*argv, "--block-swap", "1", "--fp8-base", "--compile", "--gradient-checkpointing"]) == 0
    assert (out / "lora.safetensors").exists() and len(losses(out)) == 2
    capsys.readouterr()

    try:
        code = main([*argv, "--block-swap", "-1"])
    except SystemExit as e:
        code = e.code
    assert code == 2 and ">= 0" in capsys.readouterr().err
    assert main([*argv, "--full", "--block-swap", "0"]) != 0
    assert "does not work with --full" in capsys.readouterr().err
    assert main([*argv, "--compile-mode", "reduce-overhead", "--block-swap", "1"]) != 0
    assert "(CUDA graphs) does not work with --block-swap" in capsys.readouterr().err


# ---- on a GPU -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cuda_block_swap_lowers_peak_memory_and_keeps_the_gradients(checkpointing):
    cfg = dataclasses.replace(PRESETS["tiny"], num_layers=12, attention_head_dim=64, num_attention_heads=8,
                              axes_dims_rope=(16, 24, 24))  # width 512: the weights dominate the memory

    def run(blocks_on_device):
        model = lora_dit(cfg)
        if blocks_on_device is None:
            model.cuda()
        else:
            swap = enable_block_swap(model, "cuda", blocks_on_device)
            assert all(t.device.type == "cpu" and t.is_pinned() for t in swap.swapped_tensors)
            assert all(p.is_cuda for p in model.parameters() if p.requires_grad)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
        latents, t, text = (x.cuda() for x in inputs())
        loss = model(latents, t, text, use_gradient_checkpointing=checkpointing).pow(2).mean()
        loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}
        peak = torch.cuda.max_memory_allocated()
        del model, loss
        torch.cuda.empty_cache()
        return resident, peak, grads

    resident_ref, peak_ref, grads_ref = run(None)
    resident, peak, grads = run(1)
    assert resident < 0.4 * resident_ref
    assert peak < 0.6 * peak_ref, (peak, peak_ref)
    assert max_diff(grads, grads_ref) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("modes", [
    {"block_swap": 0, "gradient_checkpointing": True},
    {"block_swap": 1, "fp8_base": True, "mixed_precision": "bf16"},
])
def test_cuda_train_runs_with_block_swap(tiny_qwen, tmp_path, modes):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    train(config(tiny_qwen[0], data, out, max_steps=2, device="cuda", **modes))
    assert (out / "lora.safetensors").exists()
    assert all(torch.isfinite(torch.tensor(losses(out))))


def test_block_swap_keeps_a_recomputed_block_until_the_previous_one_is_recomputed():
    # with checkpointing, backward holds a recomputed block's weights by reference: releasing them right
    # after the recompute would hand backward (and checkpointing's device check) the host copies
    model = lora_dit(dataclasses.replace(TINY3, num_layers=4))  # blocks 0-2 checkpointed, 3 is not
    swap = enable_block_swap(model, "cpu", 0)
    released = []
    original = BlockSwap._release

    def spy(self, block):
        released.append((block.index, block_swap._in_backward()))
        return original(self, block)

    BlockSwap._release = spy
    try:
        loss_and_grads(model, True)
    finally:
        BlockSwap._release = original
    forward = [i for i, _ in released[:4]]
    assert forward == [0, 1, 2, 3]  # the forward releases each block right after it
    assert [b.index for b in swap._held] == [0]  # the last recomputed block waits for the next forward
    assert [i for i, _ in released[4:]] == [2, 1]  # recomputed 2 is released when 1 is recomputed, and so on
