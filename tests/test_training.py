"""Training runs the inference pipeline's units: loss, resume, faults, validation, outputs."""

from __future__ import annotations

import csv
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusmith import DiffusmithError, QwenImagePipeline
from diffusmith.training import runner
from diffusmith.training.logs import MetricsLog
from diffusmith.training.runner import TrainConfig, train

COLORS = {"red": (230, 30, 30), "blue": (30, 30, 230), "green": (30, 200, 30)}


def make_dataset(folder, names=tuple(COLORS), size=64):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        image = Image.new("RGB", (size, size), COLORS[name])
        image.paste((255, 255, 255), (size // 4, size // 4, size // 2, size // 2))
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a white square on a {name} background")
    return folder


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data")


def config(model, dataset, output, **kw) -> TrainConfig:
    base = dict(model=str(model), dataset=str(dataset), output=str(output), height=64, width=64, max_steps=4,
                learning_rate=1e-3, device="cpu", lora_rank=4, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def losses(out):
    with open(out / "logs" / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_lora_training_writes_every_output(tiny_qwen, data, tmp_path):
    out = tmp_path / "run"
    final = train(config(tiny_qwen[0], data, out, save_every=2, validation_prompts=("a red square",),
                         validate_every=2, validation_steps=2))
    assert final == out / "lora.safetensors" and final.exists()
    lora = load_file(final)
    assert any(k.startswith("transformer.transformer_blocks.0.attn.to_q.lora_A") for k in lora)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert (out / "samples" / "step-000002.png").exists() and (out / "samples" / "step-000004.png").exists()
    assert len(losses(out)) == 4
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "logs").iterdir())


def sampled_latents(pipe, **kw):
    """The latents a pipeline call hands to the VAE decoder."""
    seen = []
    decode = pipe.vae.decode

    def spy(latents, **decode_kw):
        seen.append(latents.clone())
        return decode(latents, **decode_kw)

    pipe.vae.decode = spy
    try:
        pipe(**kw)
    finally:
        pipe.vae.decode = decode
    return seen[0]


def test_loss_falls_and_the_pipeline_reproduces_an_overfit_image(wide_qwen, tmp_path):
    data = make_dataset(tmp_path / "one", names=("red",), size=32)
    out = tmp_path / "overfit"
    train(config(wide_qwen, data, out, full=True, max_steps=200, learning_rate=3e-3, height=32, width=32,
                 repeat=8, batch_size=8, timestep_sampling="logit_normal"))
    curve = losses(out)
    assert np.mean(curve[-20:]) < 0.1 * np.mean(curve[:10])

    pipe = QwenImagePipeline.from_pretrained(wide_qwen, transformer=out / "model.safetensors")
    before = QwenImagePipeline.from_pretrained(wide_qwen)
    image = Image.open(data / "red.png")
    with torch.no_grad():  # the training target: the clean latents of the image
        target = pipe.vae.encode(pipe.preprocess_image(image))
    kw = dict(prompt="a white square on a red background", cfg_scale=1.0, height=32, width=32,
              num_inference_steps=20, seed=0, progress_bar=False)
    err_after = (sampled_latents(pipe, **kw) - target).abs().mean().item()
    err_before = (sampled_latents(before, **kw) - target).abs().mean().item()
    assert err_after < 0.25 * target.abs().mean().item()  # close to the image it learned
    assert err_after < 0.1 * err_before


def _crash_after(monkeypatch, crash_step):
    original = MetricsLog.log

    def log(self, step, *args, **kw):
        original(self, step, *args, **kw)
        if step == crash_step:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(MetricsLog, "log", log)


def test_resume_after_a_crash_equals_the_uninterrupted_run(tiny_qwen, data, tmp_path, monkeypatch):
    folder, _ = tiny_qwen
    kw = dict(max_steps=6, save_every=2, batch_size=2, lr_schedule="cosine", warmup_steps=2, caption_dropout=0.3)
    straight = tmp_path / "straight"
    train(config(folder, data, straight, **kw))

    crashed = tmp_path / "crashed"
    _crash_after(monkeypatch, 3)  # dies after step 3: steps since the checkpoint at 2 are lost
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(folder, data, crashed, **kw))
    monkeypatch.undo()
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["step-000002"]
    train(config(folder, data, crashed, resume="latest", **kw))

    a, b = load_file(straight / "lora.safetensors"), load_file(crashed / "lora.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert losses(crashed) == pytest.approx(losses(straight), abs=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_qwen, data, tmp_path, monkeypatch):
    from diffusmith.training.module import TrainingModule

    original = TrainingModule.loss_from_inputs
    calls = {"n": 0}

    def poisoned(self, shared, posi):
        calls["n"] += 1
        loss = original(self, shared, posi)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(TrainingModule, "loss_from_inputs", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(DiffusmithError, match="loss became nan at step 4.*step-000002"):
        train(config(folder := tiny_qwen[0], data, out, max_steps=6, save_every=2))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert folder.exists()


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tiny_qwen, data, tmp_path, monkeypatch):
    original = MetricsLog.log

    def log(self, step, *args, **kw):
        original(self, step, *args, **kw)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; handled at the step boundary

    monkeypatch.setattr(MetricsLog, "log", log)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt, match="step 3"):
        train(config(tiny_qwen[0], data, out, max_steps=5))
    monkeypatch.undo()
    assert (out / "checkpoints" / "step-000003" / "COMPLETE").exists()
    train(config(tiny_qwen[0], data, out, max_steps=5, resume="latest"))
    assert len(losses(out)) == 5 and (out / "lora.safetensors").exists()


def test_output_folder_of_another_run_is_refused(tiny_qwen, data, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_qwen[0], data, out, max_steps=1))
    with pytest.raises(DiffusmithError, match="already holds a training run.*--resume latest"):
        train(config(tiny_qwen[0], data, out, max_steps=1))
    with pytest.raises(DiffusmithError, match="lora_rank"):
        train(config(tiny_qwen[0], data, out, max_steps=2, lora_rank=8, resume="latest"))


def test_a_run_refused_while_setting_up_leaves_its_folder_free(tiny_qwen, data, tmp_path):
    """A mistake found after the folder check (here LoRA targets the model lacks, found once it is loaded)
    leaves no run behind: the corrected command starts in the same folder, without --resume."""
    out = tmp_path / "run"
    with pytest.raises(DiffusmithError, match="no_such_module"):
        train(config(tiny_qwen[0], data, out, max_steps=1, lora_targets=["no_such_module"]))
    assert not out.exists() or not any(out.iterdir())
    train(config(tiny_qwen[0], data, out, max_steps=1))
    assert (out / "lora.safetensors").exists() and len(losses(out)) == 1


def test_bad_images_are_all_listed_before_training(tiny_qwen, data, tmp_path, monkeypatch):
    (data / "red.png").unlink()
    (data / "broken.png").write_bytes(b"garbage")
    (data / "broken.txt").write_text("broken")
    loaded = []
    monkeypatch.setattr(runner, "build_pipeline", lambda *a: loaded.append(1))
    with pytest.raises(DiffusmithError) as info:
        train(config(tiny_qwen[0], data, tmp_path / "out"))
    assert "broken.png" in str(info.value) and "--skip-bad-samples" in str(info.value)
    assert not loaded  # the model was not loaded for a dataset that cannot be used


def test_skip_bad_samples_trains_on_the_rest(tiny_qwen, data, tmp_path, caplog):
    (data / "broken.png").write_bytes(b"garbage")
    (data / "broken.txt").write_text("broken")
    train(config(tiny_qwen[0], data, tmp_path / "out", max_steps=1, skip_bad_samples=True))
    assert "1" in caplog.text and (tmp_path / "out" / "lora.safetensors").exists()


@pytest.mark.parametrize("kw,match", [
    (dict(height=70), "multiple of 16"),
    (dict(max_steps=None), "--max-steps or --epochs"),
    (dict(mixed_precision="fp8"), "mixed-precision"),
    (dict(validate_every=2), "validation-prompt"),
    (dict(lora_targets=["no_such_module"]), "no_such_module"),
    (dict(max_grad_norm=-1.0), "--max-grad-norm must be a number >= 0"),  # a negative norm flips gradients
    (dict(max_grad_norm=float("nan")), "--max-grad-norm"),
    (dict(keep_checkpoints=0), "--keep-checkpoints must be a positive integer"),  # was: silently keep all
    (dict(validation_steps=0, validation_prompts=["a"], validate_every=1), "--validation-steps"),
    (dict(validation_cfg_scale=float("inf")), "--validation-cfg-scale"),
])
def test_bad_options(tiny_qwen, data, tmp_path, kw, match):
    with pytest.raises(DiffusmithError, match=match):
        train(config(tiny_qwen[0], data, tmp_path / "out", **kw))


def test_empty_dataset(tiny_qwen, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffusmithError, match="(?i)no images|empty"):
        train(config(tiny_qwen[0], tmp_path / "empty", tmp_path / "out"))


def test_full_fine_tune_freezes_the_never_used_text_branch(tiny_qwen, data, tmp_path):
    out = tmp_path / "full"
    train(config(tiny_qwen[0], data, out, full=True, max_steps=1))
    trained = load_file(out / "model.safetensors")
    original = QwenImagePipeline.from_pretrained(tiny_qwen[0]).dit.state_dict()
    last = "transformer_blocks.1"
    assert torch.equal(trained[f"{last}.txt_mlp.net.2.weight"], original[f"{last}.txt_mlp.net.2.weight"])
    assert not torch.equal(trained[f"{last}.img_mlp.net.2.weight"], original[f"{last}.img_mlp.net.2.weight"])


def test_the_training_loop_waits_for_the_device_once_per_micro_batch(tiny_qwen, data, tmp_path, monkeypatch):
    """Each read of a tensor's value on the host (``.item()``, ``float()``, ``bool()``) waits for the device
    to finish what was queued. Around the loss's forward (whose prompt step reads its mask) and the data
    loader, the loop reads the loss once per micro-batch (the finiteness check uses that value): no other
    read in backward, clipping or the optimizer step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from diffusmith.training.module import TrainingModule

    class ScalarReads(TorchDispatchMode):
        count, paused = 0, False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default and not ScalarReads.paused:
                ScalarReads.count += 1
            return func(*args, **(kwargs or {}))

    def paused(fn):
        def call(*args, **kwargs):
            ScalarReads.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                ScalarReads.paused = False
        return call

    original_stream = runner.batch_stream

    def stream(*args):
        batches = original_stream(*args)
        return iter(paused(lambda: next(batches)), None)

    monkeypatch.setattr(TrainingModule, "forward", paused(TrainingModule.forward))
    monkeypatch.setattr(runner, "batch_stream", stream)
    per_step, original_log = [], MetricsLog.log

    def log(self, step, *args, **kw):
        per_step.append(ScalarReads.count)
        original_log(self, step, *args, **kw)

    monkeypatch.setattr(MetricsLog, "log", log)
    with ScalarReads():
        train(config(tiny_qwen[0], data, tmp_path / "run", max_steps=4, gradient_accumulation=2, max_grad_norm=1.0))
    assert [b - a for a, b in zip(per_step, per_step[1:], strict=False)] == [2, 2, 2]
