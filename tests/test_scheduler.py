"""The flow-match scheduler against the reference scheduler with Qwen-Image's config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import QWEN_SCHEDULER_CONFIG

from diffusmith import DiffusmithError
from diffusmith.schedulers.flow_match import FlowMatchConfig, FlowMatchScheduler, shift_mu


def reference_sigmas(steps: int, image_seq_len: int) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    ref = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG)
    mu = calculate_shift(image_seq_len, 256, 8192, 0.5, 0.9)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return ref.sigmas


def test_one_step_schedule_is_finite():
    s = FlowMatchScheduler()
    s.set_timesteps(1, image_seq_len=16)
    assert s.sigmas.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("steps,seq_len", [(2, 16), (4, 256), (30, 6889), (50, 8192)])
def test_sigmas_match_the_reference(steps, seq_len):
    ours = FlowMatchScheduler(FlowMatchConfig.from_dict(QWEN_SCHEDULER_CONFIG))
    ours.set_timesteps(steps, image_seq_len=seq_len)
    torch.testing.assert_close(ours.sigmas, reference_sigmas(steps, seq_len), rtol=0, atol=1e-7)
    torch.testing.assert_close(ours.timesteps, ours.sigmas[:-1] * 1000)
    assert ours.sigmas[-2].item() == pytest.approx(0.02, abs=1e-6)  # terminal stretch
    assert ours.sigmas[-1].item() == 0.0


def test_mu_is_linear_in_token_count():
    cfg = FlowMatchConfig()
    assert shift_mu(256, cfg) == pytest.approx(0.5)
    assert shift_mu(8192, cfg) == pytest.approx(0.9)
    assert shift_mu(4224, cfg) == pytest.approx(0.7)


def test_more_tokens_shift_toward_noise():
    s = FlowMatchScheduler()
    s.set_timesteps(10, image_seq_len=256)
    small = s.sigmas.clone()
    s.set_timesteps(10, image_seq_len=8192)
    assert (s.sigmas[1:-2] > small[1:-2]).all()


def test_denoising_strength_starts_later():
    s = FlowMatchScheduler()
    s.set_timesteps(10, image_seq_len=1024, denoising_strength=0.5)
    assert len(s.timesteps) == 10 and s.sigmas[0] < 0.9


def test_euler_step_and_add_noise_are_consistent():
    s = FlowMatchScheduler()
    s.set_timesteps(4, image_seq_len=256)
    x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    x = s.add_noise(x0, noise, s.timesteps[0])
    v = s.training_target(x0, noise)
    # with the exact velocity every Euler step stays on the straight path from noise to x0
    for i in range(len(s.timesteps)):
        x = s.step(v, i, x)
        torch.testing.assert_close(x, s.add_noise(x0, noise, s.sigmas[i + 1] * 1000), atol=1e-5, rtol=0)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_add_noise_per_sample_timesteps():
    s = FlowMatchScheduler()
    x0, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    out = s.add_noise(x0, noise, torch.tensor([250.0, 750.0]))
    assert out[0].unique().item() == pytest.approx(0.25) and out[1].unique().item() == pytest.approx(0.75)


@pytest.mark.parametrize("kwargs", [dict(num_inference_steps=0), dict(num_inference_steps=4, denoising_strength=0.0)])
def test_bad_schedule_arguments(kwargs):
    with pytest.raises(DiffusmithError):
        FlowMatchScheduler().set_timesteps(image_seq_len=256, **kwargs)


def test_unsupported_scheduler_options_are_refused(tmp_path):
    with pytest.raises(DiffusmithError, match="use_karras_sigmas"):
        FlowMatchConfig.from_dict({**QWEN_SCHEDULER_CONFIG, "use_karras_sigmas": True})
    with pytest.raises(DiffusmithError, match="not found"):
        FlowMatchConfig.from_file(tmp_path / "scheduler_config.json")


# ---- training side ---------------------------------------------------------------------------------
from diffusmith.schedulers.flow_match import TimestepSampling  # noqa: E402


def test_shifted_sampling_draws_from_the_training_grid():
    s = FlowMatchScheduler()
    sampling = TimestepSampling(kind="shifted", mu=0.8)
    grid = s.training_sigma_grid(4096, sampling) * 1000
    t = s.sample_training_timesteps(500, 4096, sampling, torch.Generator().manual_seed(0))
    assert t.shape == (500,) and torch.isin(t, grid).all()
    assert grid.max() == pytest.approx(1000.0) and grid.min() == pytest.approx(20.0, abs=1e-3)
    # mu = 0.8 moves the median well above the unshifted 500
    assert t.median() > 600


def test_shifted_sampling_follows_the_resolution_by_default():
    s = FlowMatchScheduler()
    small = s.training_sigma_grid(256, TimestepSampling())
    large = s.training_sigma_grid(8192, TimestepSampling())
    assert (large[1:-1] >= small[1:-1]).all() and (large > small).any()


def test_logit_normal_and_fixed_shift_ranges():
    s = FlowMatchScheduler()
    g = torch.Generator().manual_seed(1)
    ln = s.sample_training_timesteps(4000, 1024, TimestepSampling(kind="logit_normal"), g)
    assert 0 < ln.min() and ln.max() < 1000 and abs(ln.median().item() - 500) < 40
    fs = s.sample_training_timesteps(4000, 1024, TimestepSampling(kind="fixed_shift", shift=3.0), g)
    # shift 3 maps the uniform median 0.5 to 0.75
    assert abs(fs.median().item() - 750) < 30


def test_bell_weighting_has_mean_one_on_its_grid_and_peaks_mid_way():
    s = FlowMatchScheduler()
    sampling = TimestepSampling(mu=0.8, weighting="bell")
    grid = s.training_sigma_grid(4096, sampling) * 1000
    w = s.training_weight(grid, 4096, sampling)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    mid, end = s.training_weight(torch.tensor([500.0, 1000.0]), 4096, sampling)
    assert mid > end
    assert torch.equal(s.training_weight(grid, 4096, TimestepSampling()), torch.ones_like(grid))


def test_unknown_sampling_names_are_refused():
    with pytest.raises(DiffusmithError, match="timestep sampling"):
        TimestepSampling(kind="cosmic")
    with pytest.raises(DiffusmithError, match="loss weighting"):
        TimestepSampling(weighting="heavy")
