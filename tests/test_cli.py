"""The command line: a picture from `diffusmith generate`, and one-line errors for user mistakes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusmith.cli import main
from diffusmith.core.memory import compile_repeated_blocks

BASE = ["generate", "--prompt", "a red circle", "--steps", "2", "--height", "64", "--width", "64",
        "--device", "cpu", "--dtype", "fp32"]


def test_generate_writes_the_same_picture_as_the_python_api(tiny_qwen, tmp_path):
    from diffusmith import QwenImagePipeline

    folder, _ = tiny_qwen
    out = tmp_path / "sub" / "out.png"
    assert main([*BASE, "--model", str(folder), "--seed", "3", "-o", str(out)]) == 0
    pipe = QwenImagePipeline.from_pretrained(folder)
    expected = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, seed=3,
                    progress_bar=False)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert [p.name for p in out.parent.iterdir()] == ["out.png"]  # no partial file left behind


def test_generate_compile_flag_compiles_the_blocks(tiny_qwen, tmp_path, monkeypatch):
    import diffusmith.pipelines.base as base

    compiled = []

    def eager_compile(model, **kwargs):  # the eager backend (which ignores a mode): the plumbing in seconds
        compiled.append((type(model).__name__, kwargs.get("mode")))
        compile_repeated_blocks(model, backend="eager", **kwargs)

    monkeypatch.setattr(base, "compile_repeated_blocks", eager_compile)
    folder, _ = tiny_qwen
    plain, fast, graphed = tmp_path / "plain.png", tmp_path / "compiled.png", tmp_path / "graphed.png"
    assert main([*BASE, "--model", str(folder), "-o", str(plain)]) == 0
    assert compiled == []
    assert main([*BASE, "--model", str(folder), "--compile", "-o", str(fast)]) == 0
    assert compiled == [("QwenImageDiT", None)]
    assert main([*BASE, "--model", str(folder), "--compile-mode", "reduce-overhead", "-o", str(graphed)]) == 0
    assert compiled[1:] == [("QwenImageDiT", "reduce-overhead")]  # --compile-mode implies --compile
    for picture in (fast, graphed):
        assert np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(picture)))


def test_generate_refuses_cuda_graphs_with_offload(tiny_qwen, tmp_path, capsys):
    folder, _ = tiny_qwen
    out = tmp_path / "out.png"
    assert main([*BASE, "--model", str(folder), "--offload", "model", "--compile-mode", "reduce-overhead",
                 "-o", str(out)]) != 0
    err = capsys.readouterr().err
    assert "need the models resident on the GPU" in err and "Traceback" not in err and not out.exists()
    with pytest.raises(SystemExit) as e:
        main([*BASE, "--model", str(folder), "--compile-mode", "fastest", "-o", str(out)])
    assert e.value.code == 2 and "invalid choice: 'fastest'" in capsys.readouterr().err


def test_inspect_tells_which_model_a_file_is(tiny_qwen, capsys):
    folder, _ = tiny_qwen
    weights = next((folder / "vae").glob("*.safetensors"))
    assert main(["inspect", str(weights)]) == 0
    assert "vae" in capsys.readouterr().out.lower()


def test_inspect_describes_a_lora_file(tmp_path, capsys):
    """A LoRA is described from its header: key style, modules, rank, dtype (diffusers' keys as save_lora
    writes them, and kohya's with alpha tensors and text-encoder tensors)."""
    from safetensors.torch import save_file

    from diffusmith.core.lora import LoraPair, save_lora

    pairs = {f"transformer_blocks.{i}.attn.to_q": LoraPair(torch.zeros(4, 32), torch.zeros(32, 4), alpha=4.0)
             for i in range(3)}
    ours = save_lora(tmp_path / "ours.safetensors", pairs, rank=4, dtype=torch.bfloat16)
    assert main(["inspect", str(ours)]) == 0
    out = capsys.readouterr().out
    assert "LoRA (lora_A/lora_B keys under 'transformer.')" in out
    assert "3 modules (e.g. transformer_blocks.0.attn.to_q" in out and "rank 4, bfloat16" in out

    kohya = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_blocks_0_q.lora_down.weight": torch.zeros(8, 16),
               "lora_unet_blocks_0_q.lora_up.weight": torch.zeros(16, 8),
               "lora_unet_blocks_0_q.alpha": torch.tensor(8.0),
               "lora_unet_blocks_1_q.lora_down.weight": torch.zeros(4, 16),
               "lora_unet_blocks_1_q.lora_up.weight": torch.zeros(16, 4),
               "lora_te1_layer_q.lora_down.weight": torch.zeros(4, 16)}, kohya)
    assert main(["inspect", str(kohya)]) == 0
    out = capsys.readouterr().out
    assert "lora_down/lora_up keys under 'lora_unet_', with alpha tensors" in out
    assert "2 modules" in out and "ranks 4 (1 module), 8 (1 module)" in out
    assert "1 text-encoder tensor " in out


def test_inspect_of_a_file_that_is_neither_model_nor_lora_is_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    odd = tmp_path / "odd.safetensors"
    save_file({"blocks.0.q.lora_A.weight": torch.zeros(4, 8), "something_else": torch.zeros(3)}, odd)
    assert main(["inspect", str(odd)]) == 2
    err = capsys.readouterr().err
    assert "cannot tell which model" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra,match", [
    (["--model", "no/such/folder/here"], "not found"),
    (["--model", "{model}", "--device", "quantum"], "unknown device"),
    (["--model", "{model}", "--dtype", "fp7"], "unknown dtype"),
    (["--model", "{model}", "--input-image", "missing.png"], "input image not found"),
    (["--model", "{model}", "-o", "{tmp}/picture.gif"], "must end in"),
    (["--model", "{model}", "--offload", "model", "--block-swap", "1"], "use --block-swap with --offload sequential"),
])
def test_user_mistakes_are_one_line(tiny_qwen, tmp_path, capsys, extra, match):
    folder, _ = tiny_qwen
    extra = [e.format(model=folder, tmp=tmp_path) for e in extra]
    if "-o" not in extra:
        extra += ["-o", str(tmp_path / "x.png")]
    assert main([*BASE, *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv,match", [
    (["generate", "--modle", "x", "--prompt", "p", "-o", "o.png"], "did you mean --model"),
    (["generate", "--model", "x", "--prompt", "p", "--steps", "-3", "-o", "o.png"], "positive integer"),
    (["generate", "--model", "x", "--prompt", "p", "--denoising-strength", "2", "-o", "o.png"], "(0, 1]"),
    (["generate", "--model", "x", "--prompt", "p", "--block-swap", "-1", "-o", "o.png"], "integer >= 0"),
])
def test_bad_flags_are_one_line(capsys, argv, match):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "diffusmith", "--debug", "generate", "--model", str(tmp_path / "none"),
           "--prompt", "p", "-o", str(tmp_path / "o.png")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_generate_batch_cfg_flag_reaches_the_pipeline(tiny_qwen, tmp_path, monkeypatch):
    from diffusmith import QwenImagePipeline

    seen = []
    call = QwenImagePipeline.__call__
    monkeypatch.setattr(QwenImagePipeline, "__call__",
                        lambda self, *a, **kw: seen.append(kw["batch_cfg"]) or call(self, *a, **kw))
    folder, _ = tiny_qwen
    cfg = ["--model", str(folder), "--cfg-scale", "4", "--negative-prompt", " "]
    for flag in ([], ["--batch-cfg"], ["--no-batch-cfg"]):
        assert main([*BASE, *cfg, *flag, "-o", str(tmp_path / "out.png")]) == 0
    assert seen == [None, True, False]  # None: the pipeline's default (batched when streamed)


def test_generate_block_swap_streams_the_dit_blocks(tiny_qwen, tmp_path, monkeypatch):
    import diffusmith.core.memory as memory

    kept = []
    enable = memory.enable_block_swap
    monkeypatch.setattr(memory, "enable_block_swap",
                        lambda model, device, blocks_on_device: kept.append(blocks_on_device)
                        or enable(model, device, blocks_on_device))
    folder, _ = tiny_qwen
    plain, swapped = tmp_path / "plain.png", tmp_path / "swapped.png"
    assert main([*BASE, "--model", str(folder), "-o", str(plain)]) == 0
    assert main([*BASE, "--model", str(folder), "--block-swap", "1", "-o", str(swapped)]) == 0
    assert kept == [1]  # implies sequential offload, one DiT block kept on the device
    diff = np.abs(np.asarray(Image.open(plain), dtype=np.int16) - np.asarray(Image.open(swapped), dtype=np.int16))
    assert diff.max() <= 1


def test_generate_fp8_flag_stores_the_dit_in_fp8(tiny_qwen, tmp_path, monkeypatch):
    import diffusmith.pipelines.qwen_image as qwen

    converted = []
    enable = qwen.enable_fp8_storage
    monkeypatch.setattr(qwen, "enable_fp8_storage", lambda model: converted.append(enable(model)))
    folder, _ = tiny_qwen
    plain, fp8 = tmp_path / "plain.png", tmp_path / "fp8.png"
    assert main([*BASE, "--model", str(folder), "-o", str(plain)]) == 0
    assert converted == []
    assert main([*BASE, "--model", str(folder), "--fp8", "-o", str(fp8)]) == 0
    assert len(converted) == 1 and converted[0]  # the DiT's block Linears
    diff = np.abs(np.asarray(Image.open(plain), dtype=np.int16) - np.asarray(Image.open(fp8), dtype=np.int16))
    assert diff.max() <= 4
