"""LoRA files: ours load in diffusers with the same picture, every key style merges alike, scale and removal,
peft layers for training, one-line errors, and the CLI flags."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusmith import DiffusmithError, QwenImagePipeline
from diffusmith.cli import main
from diffusmith.core.loading import read_safetensors_metadata
from diffusmith.core.lora import (
    LoraPair,
    apply_lora,
    find_lora_targets,
    inject_lora,
    lora_state_dict,
    read_lora,
    remove_lora,
    save_lora,
    set_lora_weights,
)
from diffusmith.core.memory import enable_fp8_storage
from diffusmith.models.qwen_image.dit import PRESETS, QwenImageDiT

pytest.importorskip("peft")

RANK, ALPHA = 4, 8.0  # alpha != rank: the scale 2 must survive every format
STEPS = 2
PROMPT = "a red circle"


def dit_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 5, 32, generator=g))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DiT, a copy with a random (as if trained) LoRA injected, and that LoRA saved by us."""
    torch.manual_seed(0)
    base = QwenImageDiT(PRESETS["tiny"]).eval()
    model = copy.deepcopy(base)
    names = inject_lora(model, QwenImageDiT.default_lora_targets, rank=RANK, alpha=ALPHA)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    path = save_lora(tmp_path_factory.mktemp("lora") / "lora.safetensors", model, rank=RANK, alpha=ALPHA)
    return SimpleNamespace(base=base, model=model, names=names, path=path, pairs=lora_state_dict(model))


def merged(base, lora, scale=1.0):
    model = copy.deepcopy(base)
    apply_lora(model, lora, scale)
    return model


def picture(pipe, seed=5):
    image = pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=STEPS, seed=seed, cfg_scale=1.0,
                 progress_bar=False)
    return np.asarray(image, dtype=np.int16)


def reference_picture(ref, seed=5):
    out = ref(prompt=PROMPT, height=64, width=64, num_inference_steps=STEPS, true_cfg_scale=1.0,
              generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
    return np.asarray(out.images[0], dtype=np.int16)


# ---- our file in diffusers ---------------------------------------------------------------------------


def test_our_lora_loads_in_diffusers_and_gives_the_same_picture(tiny_qwen, trained):
    from diffusers import QwenImagePipeline as ReferencePipeline

    folder, _ = tiny_qwen
    ref = ReferencePipeline.from_pretrained(folder)  # a fresh copy: the shared fixture stays without LoRA
    ref.set_progress_bar_config(disable=True)
    without = reference_picture(ref)
    ref.load_lora_weights(str(trained.path))
    expected = reference_picture(ref)

    pipe = QwenImagePipeline.from_pretrained(folder)
    pipe.load_lora(trained.path)
    got = picture(pipe)
    assert np.abs(got - expected).max() <= 1
    assert np.abs(expected - without).max() > 1  # the LoRA changed the picture


def test_saved_file_has_diffusers_keys_and_header(trained):
    tensors = load_file(trained.path)
    assert set(tensors) == {f"transformer.{n}.lora_{ab}.weight" for n in trained.names for ab in "AB"}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    header = json.loads(read_safetensors_metadata(trained.path)["lora_adapter_metadata"])
    assert header["transformer.r"] == RANK and header["transformer.lora_alpha"] == RANK  # the scale is folded
    assert sorted(header["transformer.target_modules"]) == sorted(trained.names)
    assert [p.name for p in trained.path.parent.iterdir()] == ["lora.safetensors"]  # no partial file left


def test_the_file_equals_the_injected_model(trained):
    latents, t, text = dit_inputs()
    with torch.no_grad():
        expected = trained.model(latents, t, text)  # peft layers, unmerged, alpha / r = 2
        got = merged(trained.base, read_lora(trained.path, trained.base))(latents, t, text)
        without = trained.base(latents, t, text)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - without).abs().max() > 1e-2


def test_tensors_alone_give_the_full_delta(trained):
    # ComfyUI reads no header, only `.alpha` tensors (none here): B @ A must already be the whole delta
    tensors = load_file(trained.path)
    model = merged(trained.base, read_lora(trained.path, trained.base))
    for name in trained.names:
        a, b = tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"]
        weight = trained.base.get_submodule(name).weight
        torch.testing.assert_close(model.get_submodule(name).weight, weight + b @ a)


def test_save_in_bf16(trained, tmp_path):
    path = save_lora(tmp_path / "half.safetensors", trained.model, dtype="bf16")
    assert {t.dtype for t in load_file(path).values()} == {torch.bfloat16}
    a = merged(trained.base, read_lora(path, trained.base)).get_submodule(trained.names[0]).weight
    b = merged(trained.base, read_lora(trained.path, trained.base)).get_submodule(trained.names[0]).weight
    torch.testing.assert_close(a, b, rtol=0, atol=2e-2)


# ---- every key style merges alike ----------------------------------------------------------------------


def _foreign_styles(pairs: dict[str, LoraPair], folder: Path) -> dict[str, Path]:
    """The same LoRA (rank 4, alpha 8) written in the styles users meet."""
    from diffusers import QwenImagePipeline as ReferencePipeline

    alpha = torch.tensor(ALPHA)
    styles: dict[str, dict[str, torch.Tensor]] = {"comfy": {}, "peft_default": {}, "kohya": {}}
    for name, p in pairs.items():
        styles["comfy"].update({f"diffusion_model.{name}.lora_A.weight": p.down,
                                f"diffusion_model.{name}.lora_B.weight": p.up,
                                f"diffusion_model.{name}.alpha": alpha})
        styles["peft_default"].update({f"{name}.lora_A.default.weight": p.down,
                                       f"{name}.lora_B.default.weight": p.up * (ALPHA / RANK)})  # no alpha: scale 1
        flat = "lora_unet_" + name.replace(".", "_")
        styles["kohya"].update({f"{flat}.lora_down.weight": p.down, f"{flat}.lora_up.weight": p.up,
                                f"{flat}.alpha": alpha})
    paths = {}
    for style, tensors in styles.items():
        paths[style] = folder / f"{style}.safetensors"
        save_file({k: v.clone().contiguous() for k, v in tensors.items()}, paths[style])
    # diffusers' own writer: unscaled weights, alpha only in the header
    ReferencePipeline.save_lora_weights(
        folder / "diffusers", transformer_lora_layers={f"{n}.lora_{ab}.weight": (p.down if ab == "A" else p.up)
                                                       for n, p in pairs.items() for ab in "AB"},
        transformer_lora_adapter_metadata={"r": RANK, "lora_alpha": ALPHA, "target_modules": sorted(pairs)})
    paths["diffusers"] = folder / "diffusers"
    return paths


@pytest.mark.parametrize("style", ["comfy", "peft_default", "kohya", "diffusers"])
def test_every_style_merges_to_the_same_weights(trained, tmp_path, style):
    path = _foreign_styles(trained.pairs, tmp_path)[style]
    lora = read_lora(path, trained.base)
    assert sorted(lora) == sorted(trained.names)
    expected = merged(trained.base, read_lora(trained.path, trained.base)).state_dict()
    got = merged(trained.base, lora).state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)
    assert not torch.equal(got[f"{trained.names[0]}.weight"], trained.base.state_dict()[f"{trained.names[0]}.weight"])


def test_kohya_names_need_the_model(trained, tmp_path):
    path = _foreign_styles(trained.pairs, tmp_path)["kohya"]
    with pytest.raises(DiffusmithError, match="kohya"):
        read_lora(path)
    assert sorted(read_lora(tmp_path / "comfy.safetensors")) == sorted(trained.names)  # dotted names do not


# ---- scale, removal, pipeline ------------------------------------------------------------------------------


def test_scale_half_merges_half_and_remove_restores(trained):
    lora = read_lora(trained.path, trained.base)
    full, half = merged(trained.base, lora), merged(trained.base, lora, scale=0.5)
    name = f"{trained.names[0]}.weight"
    w0, w1, wh = (m.state_dict()[name] for m in (trained.base, full, half))
    torch.testing.assert_close(wh - w0, 0.5 * (w1 - w0), rtol=1e-5, atol=1e-6)

    model = copy.deepcopy(trained.base)
    apply_lora(model, lora, 0.7)
    apply_lora(model, lora, -0.2)
    assert remove_lora(model) == 2
    for key, value in trained.base.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)
    assert remove_lora(model) == 0


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), None, "1", True])
def test_a_scale_that_is_not_a_finite_number_is_refused_before_any_weight_changes(trained, scale):
    lora = read_lora(trained.path, trained.base)
    model = copy.deepcopy(trained.base)
    with pytest.raises(DiffusmithError, match="LoRA scale must be a finite number"):
        apply_lora(model, lora, scale)
    for key, value in trained.base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_merge_keeps_bf16_weights_bf16(trained):
    model = copy.deepcopy(trained.base).to(torch.bfloat16)
    apply_lora(model, read_lora(trained.path, model))
    assert model.get_submodule(trained.names[0]).weight.dtype == torch.bfloat16


def test_pipeline_picks_the_dit(tiny_qwen):
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen[0])
    assert pipe.lora_target == "dit"
    with pytest.raises(DiffusmithError, match="loaded models"):
        pipe.load_lora("unused.safetensors", model_name="unet")


def test_pipeline_lora_works_with_sequential_offload(tiny_qwen, trained):
    folder, _ = tiny_qwen
    plain = QwenImagePipeline.from_pretrained(folder)
    plain.load_lora(trained.path, scale=0.8)
    streamed = QwenImagePipeline.from_pretrained(folder, offload="sequential")
    without = picture(streamed)
    streamed.load_lora(trained.path, scale=0.8)  # weights are merged where the offload hooks keep them
    # within 1/255: the streamed blocks run on fresh device copies (see test_offload_gives_the_same_picture)
    assert np.abs(picture(streamed) - picture(plain)).max() <= 1
    assert np.abs(picture(streamed) - without).max() > 1  # the LoRA reached the streamed weights


def test_pipeline_lora_merges_into_fp8_weights(tiny_qwen, trained):
    folder, _ = tiny_qwen
    plain = QwenImagePipeline.from_pretrained(folder)
    plain.load_lora(trained.path, scale=0.8)
    fp8 = QwenImagePipeline.from_pretrained(folder, fp8=True)
    without = picture(fp8)
    fp8.load_lora(trained.path, scale=0.8)  # dequantized, summed and quantized again, layer by layer
    merged = picture(fp8)
    assert np.abs(merged - without).max() > 1  # the LoRA reached the fp8 weights
    # as close to the full-precision merge as fp8 storage of the merged weights (one rounding instead of
    # two: within twice its error)
    exact = picture(plain)
    enable_fp8_storage(plain.dit)
    once = np.abs(picture(plain) - exact).mean()
    assert 0 < np.abs(merged - exact).mean() <= 2 * once


# ---- peft layers for training ------------------------------------------------------------------------------


def test_inject_starts_unchanged_and_excludes_parents(trained):
    model = copy.deepcopy(trained.base)
    names = inject_lora(model, ["to_q", "txt_mlp.net.2"], rank=2,
                        exclude=["transformer_blocks.1.txt_mlp", "transformer_blocks.0.attn.to_q"])
    assert names == ["transformer_blocks.0.txt_mlp.net.2", "transformer_blocks.1.attn.to_q"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{ab}.default.weight" for n in names for ab in "AB"}
    latents, t, text = dit_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(latents, t, text), trained.base(latents, t, text), rtol=0, atol=0)


def test_default_targets_cover_the_block_linears(trained):
    names = find_lora_targets(trained.base, QwenImageDiT.default_lora_targets)
    assert len(names) == 14 * PRESETS["tiny"].num_layers
    assert "transformer_blocks.1.txt_mod.1" in names and "proj_out" not in names


def test_target_typo_is_an_error(trained):
    with pytest.raises(DiffusmithError, match="to_qq"):
        find_lora_targets(trained.base, ["to_q", "to_qq"])


def test_set_lora_weights_into_layers_of_another_alpha(trained):
    model = copy.deepcopy(trained.base)
    inject_lora(model, QwenImageDiT.default_lora_targets, rank=RANK, alpha=1.0)
    set_lora_weights(model, read_lora(trained.path, model))
    latents, t, text = dit_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(latents, t, text), trained.model(latents, t, text), rtol=1e-5, atol=1e-5)


def test_save_checks_rank_and_alpha(trained, tmp_path):
    with pytest.raises(DiffusmithError, match="rank"):
        save_lora(tmp_path / "x.safetensors", trained.model, rank=RANK + 1)
    with pytest.raises(DiffusmithError, match="alpha"):
        save_lora(tmp_path / "x.safetensors", trained.model, alpha=ALPHA + 1)
    with pytest.raises(DiffusmithError, match="no LoRA layers"):
        save_lora(tmp_path / "x.safetensors", trained.base)
    assert list(tmp_path.iterdir()) == []


# ---- errors ------------------------------------------------------------------------------------------------------


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, path)
    return path


def _one_line_error(fn, match):
    with pytest.raises(DiffusmithError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_lora_for_modules_the_model_lacks(trained, tmp_path):
    path = _write(tmp_path / "other.safetensors", {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2)})
    model = copy.deepcopy(trained.base)
    _one_line_error(lambda: apply_lora(model, read_lora(path, model)), "another model")


def test_wrong_shapes_change_nothing(trained, tmp_path):
    good = {k: v for k, v in load_file(trained.path).items()}
    good["transformer.transformer_blocks.1.attn.to_q.lora_A.weight"] = torch.zeros(RANK, 48)
    path = _write(tmp_path / "shapes.safetensors", good)
    model = copy.deepcopy(trained.base)
    _one_line_error(lambda: apply_lora(model, read_lora(path, model)), r"transformer_blocks.1.attn.to_q.*\(32, 48\)")
    for key, value in trained.base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)  # checked before anything merged


def test_unknown_key_style(tmp_path):
    path = _write(tmp_path / "lokr.safetensors", {"transformer_blocks.0.attn.to_q.lokr_w1": torch.zeros(2, 2)})
    _one_line_error(lambda: read_lora(path), "not LoRA weights of a known style")


def test_half_a_pair_is_an_error(tmp_path):
    path = _write(tmp_path / "half.safetensors", {"transformer.x.lora_A.weight": torch.zeros(2, 4)})
    _one_line_error(lambda: read_lora(path), "only down")


def test_text_encoder_keys_are_warned_and_ignored(trained, tmp_path, caplog):
    tensors = dict(load_file(trained.path))
    tensors.update({f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj.lora_down.weight": torch.zeros(2, 8)
                    for i in range(3)})
    path = _write(tmp_path / "with_te.safetensors", tensors)
    with caplog.at_level(logging.WARNING):
        lora = read_lora(path, trained.base)
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 text-encoder" in warnings[0]
    expected = read_lora(trained.path, trained.base)
    assert sorted(lora) == sorted(expected)


def test_pickle_lora_is_refused(tmp_path):
    path = tmp_path / "lora.pt"
    torch.save({"x.lora_A.weight": torch.zeros(2, 4), "x.lora_B.weight": torch.zeros(4, 2)}, path)
    _one_line_error(lambda: read_lora(path), "pickle")
    assert sorted(read_lora(path, allow_pickle=True)) == ["x"]


# ---- command line ----------------------------------------------------------------------------------------------


def test_cli_lora_equals_the_python_api(tiny_qwen, trained, tmp_path):
    folder, _ = tiny_qwen
    out = tmp_path / "lora.png"
    argv = ["generate", "--model", str(folder), "--prompt", PROMPT, "--steps", str(STEPS), "--height", "64",
            "--width", "64", "--device", "cpu", "--dtype", "fp32", "--cfg-scale", "1", "--seed", "5",
            "--lora", str(trained.path), "--lora-scale", "0.7", "-o", str(out)]
    assert main(argv) == 0
    pipe = QwenImagePipeline.from_pretrained(folder)
    without = picture(pipe)
    pipe.load_lora(trained.path, scale=0.7)
    expected = picture(pipe)
    assert np.array_equal(np.asarray(Image.open(out), dtype=np.int16), expected)
    assert np.abs(expected - without).max() > 1


def test_cli_loras_and_scales_repeated_or_listed_are_the_same():
    from diffusmith.cli import build_parser

    base = ["generate", "--model", "m", "--prompt", "p", "-o", "o.png"]
    repeated = build_parser().parse_args([*base, "--lora", "a.safetensors", "--lora", "b.safetensors",
                                          "--lora-scale", "0.5", "--lora-scale", "2"])
    listed = build_parser().parse_args([*base, "--lora", "a.safetensors", "b.safetensors", "--lora-scale", "0.5",
                                        "2"])
    assert repeated.lora == listed.lora == ["a.safetensors", "b.safetensors"]
    assert repeated.lora_scale == listed.lora_scale == [0.5, 2.0]


@pytest.mark.parametrize("extra,match", [
    (["--lora-scale", "0.5"], "without --lora"),
    (["--lora", "a.safetensors", "--lora", "b.safetensors", "--lora-scale", "1", "--lora-scale", "2",
      "--lora-scale", "3"], "3 --lora-scale values for 2"),
])
def test_cli_lora_scale_mistakes_are_one_line(tmp_path, capsys, extra, match):
    argv = ["generate", "--model", str(tmp_path), "--prompt", "p", "-o", str(tmp_path / "o.png"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
