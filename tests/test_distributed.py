"""Sharded training (--sharding fsdp / deepspeed-zero2, or accelerate's FSDP/DeepSpeed configs): two CPU
processes (gloo) give the same weights as plain data parallel, and resume exactly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import make_dataset

from diffusmith.cli import main
from diffusmith.errors import DiffusmithError
from diffusmith.training.checkpoint import load_checkpoint, save_checkpoint
from diffusmith.training.distributed import sharding_from_environment

ROOT = Path(__file__).resolve().parent.parent


def launch(model, data, out, *extra, accelerate_config=None):
    """``diffusmith train`` on two CPU processes: through --num-processes, or accelerate launch + a config."""
    argv = ["train", "--model", str(model), "--dataset", str(data), "--output", str(out), "--height", "64",
            "--width", "64", "--device", "cpu", "--max-steps", "2", "--gradient-accumulation", "2",
            "--save-every", "1", *extra]
    if accelerate_config:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
               "--num_processes", "2", "--mixed_precision", "no", "-m", "diffusmith", *argv]
    else:
        cmd = [sys.executable, "-m", "diffusmith", *argv, "--num-processes", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    assert set(x) == set(y) and x
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def runs(tiny_qwen, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    data = make_dataset(root / "data", names=("red", "blue", "green", "red")[:3])
    launch(tiny_qwen[0], data, root / "ddp", "--lora-rank", "4")
    return tiny_qwen[0], data, root


@pytest.mark.parametrize("sharding,config", [
    ("fsdp", None),
    ("deepspeed-zero2", None),
    (None, "deepspeed_zero2.yaml"),  # accelerate's own DeepSpeed config, mapped onto the same strategy
])
def test_sharded_lora_training_matches_data_parallel_and_resumes(runs, sharding, config):
    model, data, root = runs
    out = root / (sharding or config.split(".")[0] + "-config")
    extra = ["--lora-rank", "4"] + (["--sharding", sharding] if sharding else [])
    if sharding == "fsdp":  # sampling a sharded model needs every process: must not hang
        extra += ["--validation-prompt", "a red square", "--validate-every", "2", "--validation-steps", "1"]
    accelerate_config = ROOT / "configs" / "accelerate" / config if config else None
    result = launch(model, data, out, *extra, accelerate_config=accelerate_config)
    assert ("FSDP over 2 processes" if sharding == "fsdp" else "DeepSpeed ZeRO stage 2 over 2") in result.stderr
    files = sorted(p.name for p in (out / "checkpoints" / "step-000001").iterdir())
    assert files == ["COMPLETE", "optimizer-0.safetensors", "optimizer-1.safetensors", "rng-0.safetensors",
                     "rng-1.safetensors", "state.json", "trainable.safetensors"]
    assert max_diff(out / "lora.safetensors", root / "ddp" / "lora.safetensors") <= 1e-6
    if sharding == "fsdp":
        assert (out / "samples" / "step-000002.png").is_file()
    if config:
        return  # the config only picks the strategy: resuming it is the flag's case

    straight = root / f"{out.name}-straight.safetensors"
    shutil.copy(out / "lora.safetensors", straight)
    launch(model, data, out, *extra, "--resume", str(out / "checkpoints" / "step-000001"),
           accelerate_config=accelerate_config)
    assert max_diff(out / "lora.safetensors", straight) <= 1e-6


def test_fsdp_full_fine_tuning_matches_data_parallel(runs):
    model, data, root = runs
    launch(model, data, root / "ddp-full", "--full")
    launch(model, data, root / "fsdp-full", "--full", accelerate_config=ROOT / "configs" / "accelerate" / "fsdp.yaml")
    assert max_diff(root / "fsdp-full" / "model.safetensors", root / "ddp-full" / "model.safetensors") <= 1e-6


def test_accelerate_configs_map_onto_a_sharding():
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_OFFLOAD_PARAMS": "true"}
    assert sharding_from_environment("none", env) == {"kind": "fsdp", "reshard_after_forward": False,
                                                      "offload": True}
    assert env["ACCELERATE_USE_FSDP"] == "false"  # accelerate must not wrap the model a second time
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}
    assert sharding_from_environment("deepspeed-zero1", env)["kind"] == "deepspeed-zero1"
    assert sharding_from_environment("fsdp", {}) == {"kind": "fsdp"}
    for env, match in [
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "stage 3 is not supported"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, "JSON config"),
    ]:
        with pytest.raises(DiffusmithError, match=match):
            sharding_from_environment("none", env)
    with pytest.raises(DiffusmithError, match="contradicts the accelerate config"):
        sharding_from_environment("fsdp", {"ACCELERATE_USE_DEEPSPEED": "true"})


def test_a_sharded_checkpoint_resumes_only_as_it_was_saved(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, trainable=dict(model.named_parameters()), optimizer=optimizer,
                           lr_scheduler=None, data_state={}, epoch=0, optimizer_per_rank=True)
    assert (path / "optimizer-0.safetensors").is_file() and not (path / "optimizer.safetensors").exists()
    fresh = torch.optim.AdamW(model.parameters())
    load_checkpoint(path, optimizer=fresh, num_processes=1, optimizer_per_rank=True)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(DiffusmithError, match="sharded over 1 processes; resume it with --num-processes 1"):
        load_checkpoint(path, optimizer=fresh, num_processes=2, optimizer_per_rank=True)
    with pytest.raises(DiffusmithError, match="with the --sharding it was saved with"):
        load_checkpoint(path, optimizer=fresh, num_processes=1, optimizer_per_rank=False)


@pytest.mark.parametrize("extra,match", [
    (["--sharding", "fsdp", "--block-swap", "1"], "--block-swap does not work with --sharding fsdp"),
    (["--sharding", "fsdp", "--mixed-precision", "fp16"], "bf16 or no, not fp16"),
    (["--sharding", "zero3"], "invalid choice"),
    (["--sharding", "deepspeed-zero2"], "splits the model over several processes; add --num-processes N"),
])
def test_sharding_mistakes_are_one_line(tiny_qwen, tmp_path, capsys, extra, match):
    data = make_dataset(tmp_path / "data")
    argv = ["train", "--model", str(tiny_qwen[0]), "--dataset", str(data), "--output", str(tmp_path / "run"),
            "--height", "64", "--width", "64", "--device", "cpu", "--max-steps", "1", *extra]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_train_command_closes_the_process_group_it_ran_in(tmp_path, monkeypatch):
    """A launched process that exits with its group open can abort at exit after saving; the command closes
    it once training returned (here a one-process gloo group stands for the launcher's)."""
    import torch.distributed as dist

    from diffusmith.training import runner

    monkeypatch.setattr(runner, "train", lambda config: tmp_path / "final.safetensors")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert main(["train", "--model", "m", "--dataset", "d", "--output", str(tmp_path / "run")]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
