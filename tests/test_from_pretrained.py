"""Loading a model folder: what loads, and the one-line errors for everything that should not."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusmith import DiffusmithError, QwenImagePipeline


@pytest.fixture
def copy(tiny_qwen, tmp_path):
    folder, _ = tiny_qwen
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    return target


def one_weight_file(folder):
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1
    return files[0]


def load(folder, **kw):
    return QwenImagePipeline.from_pretrained(folder, **kw)


def test_loads_all_components_in_the_requested_dtype(tiny_qwen):
    folder, ref = tiny_qwen
    pipe = load(folder, torch_dtype="bf16")
    for model in (pipe.dit, pipe.vae, pipe.text_encoder):
        params = list(model.parameters())
        assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params)
        assert not any(p.requires_grad for p in params)
    ref_w = ref.transformer.state_dict()["transformer_blocks.0.attn.to_q.weight"]
    torch.testing.assert_close(pipe.dit.state_dict()["transformer_blocks.0.attn.to_q.weight"].float(),
                               ref_w.to(torch.bfloat16).float())


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DiffusmithError, match="not found"):
        load(tmp_path / "nowhere")


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_is_named(copy, component):
    shutil.rmtree(copy / component)
    with pytest.raises(DiffusmithError, match=str(copy / component)):
        load(copy)


def test_checkpoint_of_another_model_says_what_it_looks_like(copy):
    vae_file = one_weight_file(copy / "vae")
    dit_file = one_weight_file(copy / "transformer")
    dit_file.unlink()
    shutil.copy(vae_file, copy / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(DiffusmithError, match="missing keys.*unexpected keys") as info:
        load(copy)
    message = str(info.value)
    assert "transformer" in message and "VAE" in message.upper() and "\n" not in message


def test_truncated_weights(copy):
    f = one_weight_file(copy / "transformer")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DiffusmithError, match="(corrupt|truncated)"):
        load(copy)


def test_pickle_weights_need_an_explicit_opt_in(copy):
    f = one_weight_file(copy / "vae")
    state = load_file(f)
    f.unlink()
    torch.save(state, copy / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(DiffusmithError, match="allow_pickle"):
        load(copy)
    pipe = load(copy, allow_pickle=True)
    torch.testing.assert_close(pipe.vae.state_dict()["decoder.conv_in.weight"], state["decoder.conv_in.weight"])


@pytest.mark.parametrize("kw,match", [(dict(device="tpu9"), "device"), (dict(torch_dtype="fp12"), "dtype"),
                                      (dict(offload="half"), "offload")])
def test_unknown_device_dtype_offload(tiny_qwen, kw, match):
    with pytest.raises(DiffusmithError, match=match):
        load(tiny_qwen[0], **kw)


def test_loose_transformer_file_with_a_comfyui_prefix(tiny_qwen, tmp_path):
    folder, _ = tiny_qwen
    state = load_file(one_weight_file(folder / "transformer"))
    state = {"model.diffusion_model." + k: v + 0.5 for k, v in state.items()}
    loose = tmp_path / "finetune.safetensors"
    save_file(state, loose)
    pipe = load(folder, transformer=loose)
    torch.testing.assert_close(pipe.dit.state_dict()["img_in.weight"], state["model.diffusion_model.img_in.weight"])


def test_loose_file_of_the_wrong_kind(tiny_qwen):
    folder, _ = tiny_qwen
    with pytest.raises(DiffusmithError, match="not a Qwen-Image transformer"):
        load(folder, transformer=one_weight_file(folder / "vae"))
