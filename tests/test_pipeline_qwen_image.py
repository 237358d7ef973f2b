"""Whole-picture parity with the reference pipeline, the seed's unit, offload equivalence, size rounding."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from diffusmith import DiffusmithError, PipelineUnit, QwenImagePipeline
from diffusmith.models import layers
from diffusmith.pipelines.qwen_image import QwenImageUnit_InputImageEmbedder, join_cfg_sides

STEPS = 3


@pytest.fixture(scope="module")
def pipe(tiny_qwen):
    folder, _ = tiny_qwen
    return QwenImagePipeline.from_pretrained(folder, device="cpu", torch_dtype=torch.float32)


def reference_picture(ref, height, width, seed, negative_prompt=None, cfg=1.0, prompt="a red circle"):
    out = ref(prompt=prompt, negative_prompt=negative_prompt, true_cfg_scale=cfg, height=height, width=width,
              num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
    return np.asarray(out.images[0], dtype=np.int16)


def ours(pipe, height, width, seed, negative_prompt="", cfg=1.0, prompt="a red circle", **kw):
    image = pipe(prompt=prompt, negative_prompt=negative_prompt, cfg_scale=cfg, height=height, width=width,
                 num_inference_steps=STEPS, seed=seed, progress_bar=False, **kw)
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("height,width", [(64, 64), (64, 96)])
def test_text_to_image_matches_reference_without_cfg(tiny_qwen, pipe, height, width):
    _, ref = tiny_qwen
    expected = reference_picture(ref, height, width, seed=7)
    got = ours(pipe, height, width, seed=7)
    assert got.shape == (height, width, 3)
    assert expected.std() > 1.0  # a picture, not a flat field: the comparison means something
    assert np.abs(got - expected).max() <= 1


@pytest.mark.parametrize("batch_cfg", [False, True])
@pytest.mark.parametrize("height,width", [(64, 64), (96, 64)])
def test_text_to_image_matches_reference_with_true_cfg(tiny_qwen, pipe, height, width, batch_cfg):
    """Both ways of running true CFG: the two predictions one after the other (the reference's way) and as
    one batch, with the shorter negative prompt padded and masked."""
    _, ref = tiny_qwen
    expected = reference_picture(ref, height, width, seed=3, negative_prompt=" ", cfg=4.0)
    got = ours(pipe, height, width, seed=3, negative_prompt=" ", cfg=4.0, batch_cfg=batch_cfg)
    without_cfg = ours(pipe, height, width, seed=3)
    assert np.abs(got - expected).max() <= 1
    assert np.abs(got - without_cfg).max() > 1  # CFG really changed the picture


def test_seed_controls_the_noise(pipe):
    a, b = ours(pipe, 64, 64, seed=1), ours(pipe, 64, 64, seed=2)
    assert np.abs(a - b).max() > 1
    assert np.array_equal(a, ours(pipe, 64, 64, seed=1))


# The seed document's unit, with only its import lines changed (../shared/seed/).
class SeedInputImageEmbedder(PipelineUnit):
    def __init__(self):
        super().__init__(
            input_params=("input_image", "noise", "tiled", "tile_size", "tile_stride"),
            output_params=("latents", "input_latents"),
            onload_model_names=("vae",)
        )

    def process(self, pipe: QwenImagePipeline, input_image, noise, tiled, tile_size, tile_stride):
        if input_image is None:
            return {"latents": noise, "input_latents": None}
        pipe.load_models_to_device(['vae'])
        image = pipe.preprocess_image(input_image).to(device=pipe.device, dtype=pipe.torch_dtype)
        input_latents = pipe.vae.encode(image, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)
        if pipe.scheduler.training:
            return {"latents": noise, "input_latents": input_latents}
        else:
            latents = pipe.scheduler.add_noise(input_latents, noise, timestep=pipe.scheduler.timesteps[0])
            return {"latents": latents, "input_latents": input_latents}


def _gradient_image(height, width):
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width, y / height, 0.5 + 0.0 * x], axis=-1) * 255
    return Image.fromarray(rgb.astype(np.uint8))


def test_seed_unit_runs_in_the_pipeline_and_matches_ours(tiny_qwen):
    folder, _ = tiny_qwen
    pipe = QwenImagePipeline.from_pretrained(folder)
    source = _gradient_image(64, 64)
    builtin = ours(pipe, 64, 64, seed=5, input_image=source, denoising_strength=0.6)
    index = next(i for i, u in enumerate(pipe.units) if isinstance(u, QwenImageUnit_InputImageEmbedder))
    pipe.units[index] = SeedInputImageEmbedder()
    seeded = ours(pipe, 64, 64, seed=5, input_image=source, denoising_strength=0.6)
    assert np.array_equal(builtin, seeded)
    text_to_image = ours(pipe, 64, 64, seed=5)
    assert np.abs(seeded - text_to_image).max() > 1  # the input image mattered


def test_seed_unit_in_training_mode_returns_clean_latents_and_pure_noise(pipe):
    unit = SeedInputImageEmbedder()
    noise = torch.randn(1, 16, 8, 8)
    pipe.scheduler.set_timesteps(2, image_seq_len=16)
    pipe.scheduler.training = True
    try:
        out = unit.process(pipe, _gradient_image(64, 64), noise, False, 128, 64)
    finally:
        pipe.scheduler.training = False
    assert out["latents"] is noise
    assert out["input_latents"].shape == (1, 16, 8, 8)
    pipe.scheduler.set_timesteps(2, image_seq_len=16)
    inference = unit.process(pipe, _gradient_image(64, 64), noise, False, 128, 64)
    sigma = pipe.scheduler.timesteps[0] / 1000
    expected = (1 - sigma) * out["input_latents"] + sigma * noise
    torch.testing.assert_close(inference["latents"], expected)


def test_image_to_image_strength_keeps_the_input_closer(pipe):
    # a random VAE does not reproduce pictures, so compare with the VAE round trip of the source
    source = _gradient_image(64, 64)
    with torch.no_grad():
        x = pipe.preprocess_image(source)
        roundtrip = np.asarray(pipe.postprocess_image(pipe.vae.decode(pipe.vae.encode(x)))[0], dtype=np.int16)
    weak = ours(pipe, 64, 64, seed=4, input_image=source, denoising_strength=0.1)
    strong = ours(pipe, 64, 64, seed=4, input_image=source, denoising_strength=1.0)
    assert np.abs(weak - roundtrip).mean() < 0.8 * np.abs(strong - roundtrip).mean()


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_gives_the_same_picture(tiny_qwen, pipe, offload):
    folder, _ = tiny_qwen
    offloaded = QwenImagePipeline.from_pretrained(folder, offload=offload)
    kw = dict(negative_prompt=" ", cfg=4.0, batch_cfg=False)  # the same computation
    # model offload runs on the loaded weights themselves: the same bits; sequential offload runs on fresh
    # device copies of the blocks, whose other memory alignment changes the products' last bits (velocities
    # within 4e-7 of each other on this model)
    tolerance = 0 if offload == "model" else 1
    assert np.abs(ours(offloaded, 64, 64, seed=9, **kw) - ours(pipe, 64, 64, seed=9, **kw)).max() <= tolerance


@pytest.fixture
def block_swaps(monkeypatch):
    """Every BlockSwap made while the test runs, in order."""
    import diffusmith.core.memory as memory

    made = []
    enable = memory.enable_block_swap
    monkeypatch.setattr(memory, "enable_block_swap", lambda *a, **kw: made.append(enable(*a, **kw)) or made[-1])
    return made


def _count_block_calls(pipe):
    """The batch size of every DiT block call, in order."""
    calls = []
    for block in pipe.dit.transformer_blocks:
        block.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["image"].shape[0]),
                                        with_kwargs=True)
    return calls


def test_sequential_offload_batches_cfg_and_streams_each_block_once_per_step(tiny_qwen, pipe, block_swaps):
    """Streamed block by block, a true-CFG step moves every block to the device once (one batch of two),
    not twice, each block copied ahead while the one before it computes; the picture is the one of two
    separate predictions, up to the masked padding's last bits."""
    folder, _ = tiny_qwen
    streamed = QwenImagePipeline.from_pretrained(folder, offload="sequential")
    assert streamed.batches_cfg() and not pipe.batches_cfg()
    (swap,) = block_swaps  # the DiT's blocks (the text encoder and the VAE move module by module)
    assert len(swap.blocks) == len(streamed.dit.transformer_blocks)
    calls = _count_block_calls(streamed)
    kw = dict(negative_prompt=" ", cfg=4.0)
    batched = ours(streamed, 64, 64, seed=9, **kw)
    blocks = len(streamed.dit.transformer_blocks)
    assert calls == [2] * (STEPS * blocks)  # one call per block and step, on both sides at once
    assert swap.stats == {"fetches": 0, "prefetches": STEPS * blocks, "backward_fetches": 0}
    calls.clear()
    separate = ours(streamed, 64, 64, seed=9, batch_cfg=False, **kw)
    assert calls == [1] * (2 * STEPS * blocks)
    assert swap.stats["prefetches"] == 3 * STEPS * blocks and swap.stats["fetches"] == 0
    assert np.abs(batched - separate).max() <= 1
    assert np.abs(batched - ours(pipe, 64, 64, seed=9, **kw)).max() <= 1


def test_block_swap_keeps_the_last_blocks_and_streams_the_others(tiny_qwen, pipe, block_swaps):
    folder, _ = tiny_qwen
    swapped = QwenImagePipeline.from_pretrained(folder, block_swap=1)  # implies sequential offload
    (swap,) = block_swaps
    blocks = len(swapped.dit.transformer_blocks)
    assert sorted(swap.blocks) == list(range(blocks - 1))  # all but the last one streamed
    assert swapped.batches_cfg()
    kw = dict(negative_prompt=" ", cfg=4.0)
    assert np.abs(ours(swapped, 64, 64, seed=9, **kw) - ours(pipe, 64, 64, seed=9, **kw)).max() <= 1
    assert swap.stats["prefetches"] == STEPS * (blocks - 1) and swap.stats["fetches"] == 0


def test_fp8_storage_draws_nearly_the_same_picture_in_a_quarter_of_the_block_memory(tiny_qwen, pipe):
    from diffusmith.core.memory import Fp8Linear

    folder, _ = tiny_qwen
    fp8 = QwenImagePipeline.from_pretrained(folder, fp8=True)
    blocks = fp8.dit.transformer_blocks
    assert isinstance(blocks[0].attn.to_q, Fp8Linear) and isinstance(blocks[-1].img_mlp.net[2], Fp8Linear)
    linears = [n for n, m in pipe.dit.transformer_blocks.named_modules() if isinstance(m, torch.nn.Linear)]
    assert all(isinstance(blocks.get_submodule(n), Fp8Linear) for n in linears)
    weight_bytes = sum(blocks.get_submodule(n).weight.nbytes for n in linears)
    assert weight_bytes * 4 == sum(pipe.dit.transformer_blocks.get_submodule(n).weight.nbytes for n in linears)
    kw = dict(negative_prompt=" ", cfg=4.0)
    exact, rounded = ours(pipe, 64, 64, seed=9, **kw), ours(fp8, 64, 64, seed=9, **kw)
    other_seed = ours(pipe, 64, 64, seed=10, **kw)
    assert np.abs(rounded - exact).mean() < 0.05 * np.abs(other_seed - exact).mean()  # fp8 rounding, no more
    assert np.abs(rounded - exact).max() <= 4
    # with block swap: fp8 weights streamed, the same picture up to the fresh copies' last bits
    streamed = QwenImagePipeline.from_pretrained(folder, fp8=True, block_swap=1)
    assert np.abs(ours(streamed, 64, 64, seed=9, **kw) - rounded).max() <= 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_swap=-1), "number of blocks >= 0"),
    (dict(block_swap="2"), "number of blocks >= 0"),
    (dict(block_swap=True), "number of blocks >= 0"),
    (dict(block_swap=2, offload="model"), "use --block-swap with --offload sequential"),
])
def test_bad_block_swap_is_refused_before_loading(tmp_path, kwargs, match):
    with pytest.raises(DiffusmithError, match=match):
        QwenImagePipeline.from_pretrained(tmp_path / "not-even-a-model", **kwargs)


def test_join_cfg_sides_pads_the_shorter_prompt_and_masks_the_padding():
    pos, neg = torch.randn(1, 5, 8), torch.randn(1, 3, 8)
    joined = join_cfg_sides({"prompt_emb": pos, "prompt_emb_mask": None}, {"prompt_emb": neg})
    assert joined["prompt_emb"].shape == (2, 5, 8)
    assert torch.equal(joined["prompt_emb"][0], pos[0]) and torch.equal(joined["prompt_emb"][1, :3], neg[0])
    assert not joined["prompt_emb"][1, 3:].any()
    assert joined["prompt_emb_mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    longer_negative = join_cfg_sides({"prompt_emb": neg}, {"prompt_emb": pos})
    assert longer_negative["prompt_emb_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    # a side's own padding mask is kept; equal lengths without masks need no mask at all
    own = join_cfg_sides({"prompt_emb": pos, "prompt_emb_mask": torch.tensor([[1, 1, 1, 1, 0]])},
                         {"prompt_emb": pos, "prompt_emb_mask": None})
    assert own["prompt_emb_mask"].tolist() == [[True] * 4 + [False], [True] * 5]
    same = join_cfg_sides({"prompt_emb": pos}, {"prompt_emb": pos, "prompt_emb_mask": None})
    assert same["prompt_emb_mask"] is None and same["prompt_emb"].shape == (2, 5, 8)
    # a per-side tensor it does not know how to join is refused, not dropped
    with pytest.raises(DiffusmithError, match="batch_cfg=False"):
        join_cfg_sides({"prompt_emb": pos, "edit_latents": pos}, {"prompt_emb": neg})


def test_batched_cfg_velocity_equals_two_predictions(pipe):
    """The guided velocity of one step, batched and separate, in float32: equal to ~1e-6. Without the padding
    mask (the error this guards against) the batched one is far off."""
    torch.manual_seed(0)
    dim = pipe.dit.config.joint_attention_dim
    posi = {"prompt_emb": torch.randn(1, 7, dim), "prompt_emb_mask": None}
    nega = {"prompt_emb": torch.randn(1, 2, dim), "prompt_emb_mask": None}
    latents, timestep = torch.randn(1, 16, 8, 8), torch.tensor(700.0)
    with torch.no_grad():
        separate = pipe.guided_velocity({}, posi, nega, latents, timestep, 4.0)
        joined = join_cfg_sides(posi, nega)
        batched = pipe.guided_velocity({}, joined, None, latents, timestep, 4.0)
        unmasked = pipe.guided_velocity({}, {**joined, "prompt_emb_mask": None}, None, latents, timestep, 4.0)
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=1e-5)
    assert (unmasked - separate).abs().max() > 1e-3


@pytest.mark.parametrize("offload", ["none", "sequential"])
def test_compiled_blocks_give_the_same_picture(tiny_qwen, pipe, offload, monkeypatch):
    """pipe.compile() (eager backend: the tracing in seconds; fullgraph: a graph break is an error).

    Compiled code runs the MLP's projection and GELU as two ops; eager CPU inference fuses them (one rounding
    fewer: tests/test_fused_linear_gelu.py), so the eager side runs them unfused here, for a bitwise check."""
    monkeypatch.setattr(layers, "_fuses_linear_gelu", lambda proj, x: False)
    folder, _ = tiny_qwen
    compiled = QwenImagePipeline.from_pretrained(folder, offload=offload)
    compiled.compile(backend="eager", fullgraph=True)
    kw = dict(negative_prompt=" ", cfg=4.0)
    # streamed, it batches the CFG sides by default: compare with the same computation (on fresh copies of
    # the blocks, up to the last bits: see test_offload_gives_the_same_picture)
    same = ours(pipe, 64, 64, seed=9, batch_cfg=compiled.batches_cfg(), **kw)
    assert np.abs(ours(compiled, 64, 64, seed=9, **kw) - same).max() <= (0 if offload == "none" else 1)
    with pytest.raises(DiffusmithError, match="already compiled"):
        compiled.compile()
    with pytest.raises(DiffusmithError, match="repeated"):
        compiled.compile("vae")  # no block list to compile
    with pytest.raises(DiffusmithError, match="loaded models are"):
        compiled.compile("controlnet")


def test_model_offload_moves_only_what_a_unit_needs(pipe, monkeypatch):
    moves = []
    for name, model in pipe.models().items():
        monkeypatch.setattr(model, "to", lambda device, _n=name: moves.append((_n, str(device))))
    from diffusmith.core.offload import OffloadMode

    monkeypatch.setattr(pipe.placer, "mode", OffloadMode.MODEL)
    pipe.load_models_to_device(["vae"])
    assert moves[-1] == ("vae", str(pipe.device))
    assert {("dit", "cpu"), ("text_encoder", "cpu")} <= set(moves)
    with pytest.raises(KeyError, match="unknown model"):
        pipe.load_models_to_device(["unet"])


def test_sizes_round_to_multiples_of_16_with_a_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        image = pipe(prompt="x", cfg_scale=1.0, height=70, width=90, num_inference_steps=1, seed=0,
                     progress_bar=False)
    assert image.size == (96, 64)
    assert sum("multiple of 16" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=-64), "height"),
    (dict(width=100000), "width"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=10**6), "num_inference_steps"),
    (dict(denoising_strength=1.5, input_image=Image.new("RGB", (64, 64))), "denoising_strength"),
    (dict(input_image="does/not/exist.png"), "not found"),
    (dict(cfg_scale=-1.0), "cfg_scale"),
    (dict(batch_cfg="yes"), "batch_cfg must be True, False or None"),
    (dict(height=0), "height=0 is out of range"),  # not taken for "no height given"
    (dict(prompt=None), "prompt must be a string"),
    (dict(prompt=["a", "b"]), "once per prompt"),
    (dict(negative_prompt=None, cfg_scale=4.0), "negative_prompt must be a string"),
    (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number"),
    (dict(cfg_scale="4"), "cfg_scale must be a finite number"),
    (dict(seed="abc"), "seed must be an integer"),
])
def test_bad_call_arguments_raise_one_line_errors(pipe, kwargs, match):
    args = dict(prompt="x", height=64, width=64, num_inference_steps=1, progress_bar=False)
    args.update(kwargs)
    with pytest.raises(DiffusmithError, match=match) as info:
        pipe(**args)
    assert "\n" not in str(info.value)


def test_numpy_numbers_are_taken_for_seed_and_cfg_scale(pipe):
    args = dict(prompt="x", height=64, width=64, num_inference_steps=1, progress_bar=False)
    expected = np.asarray(pipe(**args, seed=3, cfg_scale=2.0))
    got = np.asarray(pipe(**args, seed=np.int64(3), cfg_scale=np.float32(2.0)))
    assert np.array_equal(got, expected)


def test_unreadable_input_image(pipe, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DiffusmithError, match="cannot read input image"):
        pipe(prompt="x", input_image=bad, num_inference_steps=1, progress_bar=False)
