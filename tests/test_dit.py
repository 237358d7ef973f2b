"""Qwen-Image DiT: parity with the reference, checkpointing, packing, structure, config."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
from reference_dit import TINY_DIT_CONFIG, tiny_reference_dit

from diffusmith.core.checkpointing import gradient_checkpoint_forward
from diffusmith.errors import DiffusmithError
from diffusmith.models.qwen_image.dit import (
    PRESETS,
    QwenImageDiT,
    QwenImageDiTConfig,
    patchify,
    rope_tables,
    unpatchify,
)

TIMESTEPS = torch.tensor([937.5, 412.25])  # sigma * 1000


@pytest.fixture(scope="module")
def models() -> tuple[QwenImageTransformer2DModel, QwenImageDiT]:
    reference = tiny_reference_dit(seed=0)
    ours = QwenImageDiT(QwenImageDiTConfig.from_dict(TINY_DIT_CONFIG)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def make_inputs(batch: int, h: int, w: int, text_len: int, padded: int, seed: int = 1):
    """Latents, timestep, text, and a 0/1 mask whose last sample has ``padded`` padding tokens (None if 0)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, h, w, generator=g)
    text = torch.randn(batch, text_len, TINY_DIT_CONFIG["joint_attention_dim"], generator=g)
    mask = None
    if padded:
        mask = torch.ones(batch, text_len, dtype=torch.long)
        mask[-1, text_len - padded :] = 0
    return latents, TIMESTEPS[:batch], text, mask


def reference_velocity(reference, latents, timestep, text, mask) -> torch.Tensor:
    """The reference DiT called as pipeline_qwenimage.py calls it, unpacked to (B, 16, h, w)."""
    b, c, h, w = latents.shape
    packed = QwenImagePipeline._pack_latents(latents, b, c, h, w)
    out = reference(
        hidden_states=packed,
        encoder_hidden_states=text,
        encoder_hidden_states_mask=mask,
        timestep=timestep / 1000,
        img_shapes=[(1, h // 2, w // 2)] * b,
        return_dict=False,
    )[0]
    return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]


# ---------------------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch, h, w, text_len, padded",
    [
        (2, 8, 8, 7, 3),  # square, batch 2, padding in the second sample
        (1, 4, 8, 5, 0),  # non-square, no mask
        (2, 6, 10, 9, 4),  # odd patch grid (3 x 5), padded
    ],
)
def test_parity_with_reference_fp32(models, batch, h, w, text_len, padded):
    reference, ours = models
    latents, timestep, text, mask = make_inputs(batch, h, w, text_len, padded)
    with torch.no_grad():
        expected = reference_velocity(reference, latents, timestep, text, mask)
        got = ours(latents, timestep, text, mask)
    assert got.shape == (batch, 16, h, w)
    assert (got - expected).abs().max().item() <= 1e-5


def test_text_padding_is_masked(models):
    _, ours = models
    latents, timestep, text, mask = make_inputs(2, 8, 8, 7, padded=3)
    changed = text.clone()
    changed[-1, -3:] += 5.0  # only the padded tokens of the last sample
    with torch.no_grad():
        base = ours(latents, timestep, text, mask)
        same = ours(latents, timestep, changed, mask)
        unmasked = ours(latents, timestep, text, None)
    assert (same - base).abs().max().item() <= 1e-6
    assert (unmasked[-1] - base[-1]).abs().max().item() > 1e-3  # the mask does something
    assert (unmasked[0] - base[0]).abs().max().item() <= 1e-5  # the first sample has no padding


def test_parity_with_reference_bf16():
    reference = tiny_reference_dit(seed=0).to(torch.bfloat16)
    ours_bf16 = QwenImageDiT(PRESETS["tiny"]).to(torch.bfloat16)
    ours_bf16.load_state_dict(reference.state_dict(), strict=True)
    latents, timestep, text, mask = make_inputs(2, 8, 8, 7, padded=3)
    latents, text = latents.bfloat16(), text.bfloat16()
    with torch.no_grad():
        expected = reference_velocity(reference, latents, timestep.bfloat16(), text, mask).float()
        got = ours_bf16(latents, timestep, text, mask)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max().item() <= 0.03  # a few bf16 ulps at |v| ~ 2


def test_last_block_skips_the_text_stream_it_drops(models):
    """The last block's text result is discarded: its text queries, text output projection and text MLP do
    not run, and a block called with text_output=False gives the same image as a full call (the parity tests
    above check the whole model against the reference)."""
    _, ours = models
    latents, timestep, text, mask = make_inputs(2, 8, 8, 7, padded=3)
    last = ours.transformer_blocks[-1]
    skipped = {"add_q_proj": last.attn.add_q_proj, "to_add_out": last.attn.to_add_out, "txt_mlp": last.txt_mlp}
    ran = []
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: ran.append(name))
             for name, m in skipped.items()]
    hooks.append(ours.transformer_blocks[0].attn.to_add_out.register_forward_hook(
        lambda mod, args, out: ran.append("first block's to_add_out")))
    captured = {}
    hooks.append(last.register_forward_pre_hook(lambda mod, args, kwargs: captured.update(kwargs),
                                                with_kwargs=True))
    try:
        with torch.no_grad():
            ours(latents, timestep, text, mask)
    finally:
        for h in hooks:
            h.remove()
    assert ran == ["first block's to_add_out"]
    block_inputs = {k: v for k, v in captured.items() if k != "text_output"}
    with torch.no_grad():
        text_full, image_full = last(**block_inputs, text_output=True)
        text_none, image_skip = last(**block_inputs, text_output=False)
    assert text_none is None and text_full.shape == block_inputs["text"].shape
    assert (image_skip - image_full).abs().max().item() <= 1e-6


def test_rope_tables_built_once_per_shape(models):
    _, ours = models
    latents, timestep, text, mask = make_inputs(1, 12, 4, 3, padded=0)
    rope_tables.cache_clear()
    with torch.no_grad():
        ours(latents, timestep, text, mask)
        ours(latents, timestep, text, mask)
    info = rope_tables.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_tables_made_in_inference_mode_serve_training(models):
    _, ours = models
    latents, timestep, text, mask = make_inputs(1, 4, 4, 2, padded=0, seed=5)
    rope_tables.cache_clear()
    with torch.inference_mode():
        ours(latents, timestep, text, mask)
    ours(latents, timestep, text, mask).sum().backward()  # would fail on inference tensors
    ours.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------------------


def _loss_and_grads(model: QwenImageDiT, inputs, **flags) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    latents, timestep, text, mask = inputs
    out = model(latents, timestep, text, mask, **flags)
    weights = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "flags",
    [
        {"use_gradient_checkpointing": True},
        {"use_gradient_checkpointing": True, "use_gradient_checkpointing_offload": True},
        {"use_gradient_checkpointing_offload": True},
        {"use_gradient_checkpointing": True, "gradient_checkpointing_mode": "selective"},
        {"use_gradient_checkpointing_offload": True, "gradient_checkpointing_mode": "selective"},
    ],
)
def test_gradient_checkpointing_same_output_and_grads(models, flags):
    _, ours = models
    inputs = make_inputs(2, 8, 8, 7, padded=3)
    calls = []
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in ours.transformer_blocks]
    try:
        base_out, base_grads = _loss_and_grads(ours, inputs)
        plain_calls = len(calls)
        out, grads = _loss_and_grads(ours, inputs, **flags)
    finally:
        for hook in hooks:
            hook.remove()
    # every block but the last ran again in backward (checkpointing leaves the last block unchecked)
    assert len(calls) - plain_calls == plain_calls + (plain_calls - 1)
    assert (out - base_out).abs().max().item() <= 1e-6
    assert grads.keys() == base_grads.keys()
    for name, grad in grads.items():
        base = base_grads[name]
        assert (grad is None) == (base is None), name
        if grad is not None:
            assert (grad - base).abs().max().item() <= 1e-6, name
    # The text stream's output of the last block is unused: its last projections get no gradient.
    last = len(ours.transformer_blocks) - 1
    assert base_grads[f"transformer_blocks.{last}.txt_mlp.net.2.weight"] is None
    ours.zero_grad(set_to_none=True)


def test_offload_saves_keyword_inputs_through_save_on_cpu(monkeypatch):
    packed: list[torch.Tensor] = []

    class RecordingSaveOnCpu(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory: bool = False):
            super().__init__(lambda t: packed.append(t) or t, lambda t: t)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", RecordingSaveOnCpu)
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.randn(3, 4)

    def block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.tanh(layer(a) * b)

    out = gradient_checkpoint_forward(block, False, True, a=x, b=y)
    out.sum().backward()
    assert any(t is x for t in packed) and any(t is y for t in packed)


def test_checkpointing_is_a_plain_call_without_grad():
    calls = []

    def block(a: torch.Tensor) -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        return a * 2

    with torch.no_grad():
        out = gradient_checkpoint_forward(block, True, True, torch.ones(2, requires_grad=True))
    assert calls == [False] and not out.requires_grad


# ---------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(8, 8), (4, 10)])
def test_patchify_matches_reference_packing_and_round_trips(h, w):
    latents = torch.randn(2, 16, h, w)
    tokens = patchify(latents)
    assert tokens.shape == (2, (h // 2) * (w // 2), 64)
    assert torch.equal(tokens, QwenImagePipeline._pack_latents(latents, 2, 16, h, w))
    assert torch.equal(unpatchify(tokens, h, w), latents)
    assert torch.equal(unpatchify(tokens, h, w), QwenImagePipeline._unpack_latents(tokens, h * 8, w * 8, 8)[:, :, 0])


# ---------------------------------------------------------------------------------------------------------
# Structure and config
# ---------------------------------------------------------------------------------------------------------


def test_real_preset_has_the_checkpoint_layout():
    with torch.device("meta"):
        ours = QwenImageDiT(PRESETS["real"])
        reference = QwenImageTransformer2DModel()
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours_shapes == ref_shapes
    assert len(ours_shapes) == 1933
    assert round(sum(v.numel() for v in ours.state_dict().values()) / 1e9, 2) == 20.43


def test_from_dict_reads_official_config():
    official = {
        "_class_name": "QwenImageTransformer2DModel",
        "_diffusers_version": "0.34.0.dev0",
        "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": False,
        "in_channels": 64,
        "joint_attention_dim": 3584,
        "num_attention_heads": 24,
        "num_layers": 60,
        "out_channels": 16,
        "patch_size": 2,
        "pooled_projection_dim": 768,
    }
    assert QwenImageDiTConfig.from_dict(official) == PRESETS["real"]
    assert QwenImageDiTConfig.from_dict(TINY_DIT_CONFIG) == PRESETS["tiny"]


@pytest.mark.parametrize("flag", ["guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"])
def test_from_dict_rejects_unsupported_flags(flag):
    assert QwenImageDiTConfig.from_dict({**TINY_DIT_CONFIG, flag: False}) == PRESETS["tiny"]
    with pytest.raises(DiffusmithError, match="not supported"):
        QwenImageDiTConfig.from_dict({**TINY_DIT_CONFIG, flag: True})


def test_bad_inputs_raise_diffusmith_error(models):
    _, ours = models
    latents, timestep, text, mask = make_inputs(2, 8, 8, 7, padded=3)
    with pytest.raises(DiffusmithError):
        ours(latents[:, :, :7], timestep, text, mask)  # odd height
    with pytest.raises(DiffusmithError):
        ours(latents, timestep, text[..., :16], mask)  # wrong text width
    with pytest.raises(DiffusmithError):
        ours(latents, timestep, text, mask[:, :5])  # mask shorter than text
    with pytest.raises(DiffusmithError):
        ours(latents, torch.ones(3), text, mask)  # three timesteps for two samples
