"""`diffusmith train` from the shell: outputs, data-parallel processes, the example script, mistakes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import make_dataset

from diffusmith import QwenImagePipeline
from diffusmith.cli import main
from diffusmith.training.module import LossSpec, TrainableSpec, TrainingModule

ROOT = Path(__file__).resolve().parent.parent


def train_argv(model, data, out, *extra):
    return ["train", "--model", str(model), "--dataset", str(data), "--output", str(out), "--height", "64",
            "--width", "64", "--device", "cpu", "--lora-rank", "4", *extra]


def test_train_then_generate_with_the_lora(tiny_qwen, tmp_path, capsys):
    folder, _ = tiny_qwen
    data, out = make_dataset(tmp_path / "data"), tmp_path / "run"
    assert main(train_argv(folder, data, out, "--max-steps", "2", "--learning-rate", "1e-2",
                           "--lora-targets", "to_q,to_k,img_mlp.net.2")) == 0
    assert f"saved {out / 'lora.safetensors'}" in capsys.readouterr().out
    lora = load_file(out / "lora.safetensors")
    assert {k.split(".")[-3] for k in lora} == {"to_q", "to_k", "2"}
    picture = tmp_path / "p.png"
    assert main(["generate", "--model", str(folder), "--prompt", "x", "--steps", "2", "--height", "64", "--width",
                 "64", "--lora", str(out / "lora.safetensors"), "-o", str(picture)]) == 0
    assert picture.exists()


@pytest.mark.parametrize("extra,match", [
    (["--max-steps", "2", "--epochs", "1"], "exactly one of --max-steps or --epochs"),
    (["--max-steps", "2", "--height", "60"], "multiple of 16"),
    (["--max-steps", "2", "--caption-dropout", "1.5"], "[0, 1)"),
    (["--max-steps", "2", "--lerning-rate", "1"], "did you mean --learning-rate"),
    (["--max-steps", "2", "--gradient-checkpointing-mode", "selective"], "needs --gradient-checkpointing"),
    (["--max-steps", "2", "--gradient-checkpointing-interval", "2"], "needs --gradient-checkpointing"),
    (["--max-steps", "2", "--gradient-checkpointing", "--gradient-checkpointing-interval", "0"], "positive integer"),
])
def test_train_mistakes_are_one_line(tiny_qwen, tmp_path, capsys, extra, match):
    data = make_dataset(tmp_path / "data")
    try:
        code = main(train_argv(tiny_qwen[0], data, tmp_path / "run", *extra))
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


def test_two_processes_train_and_agree(tiny_qwen, tmp_path):
    data, out = make_dataset(tmp_path / "data", names=("red", "blue", "green", "red")[:3]), tmp_path / "ddp"
    cmd = [sys.executable, "-m", "diffusmith", *train_argv(tiny_qwen[0], data, out, "--max-steps", "2",
                                                            "--num-processes", "2", "--save-every", "1")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "all 2 processes hold the same weights" in result.stderr
    assert (out / "lora.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints" / "step-000001").iterdir()) == [
        "COMPLETE", "optimizer.safetensors", "rng-0.safetensors", "rng-1.safetensors", "state.json",
        "trainable.safetensors"]


def test_the_example_script_trains(tiny_qwen, tmp_path):
    data = make_dataset(tmp_path / "data")
    cmd = [sys.executable, str(ROOT / "examples" / "qwen_image" / "train.py"), "--model", str(tiny_qwen[0]),
           "--dataset", str(data), "--output", str(tmp_path / "ex"), "--size", "64", "--steps", "2",
           "--save-every", "1", "--rank", "4", "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "ex" / "lora.safetensors").exists()


@pytest.mark.parametrize("offload,mode,interval", [(False, "full", 1), (True, "full", 1), (False, "selective", 1),
                                                   (False, "full", 2)])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_qwen, tmp_path, offload, mode, interval):
    data = make_dataset(tmp_path / "data")
    from diffusmith.training.data import collate_samples, load_dataset

    batch = collate_samples([load_dataset(data, height=64, width=64)[i] for i in range(2)])
    results = []
    for checkpointing in (False, True):
        pipe = QwenImagePipeline.from_pretrained(tiny_qwen[0])
        torch.manual_seed(0)
        module = TrainingModule(pipe, TrainableSpec(rank=4),
                                LossSpec(use_gradient_checkpointing=checkpointing,
                                         use_gradient_checkpointing_offload=offload and checkpointing,
                                         gradient_checkpointing_mode=mode,
                                         gradient_checkpointing_interval=interval))
        for p in module.trainable_parameters().values():  # LoRA B starts at 0: make the gradients non-trivial
            torch.nn.init.normal_(p, std=0.1)
        torch.manual_seed(1)
        loss = module(batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in module.trainable_parameters().items()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert grads_a.keys() == grads_b.keys()
    assert max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a) <= 1e-6
    assert max(g.abs().max().item() for g in grads_a.values()) > 0
