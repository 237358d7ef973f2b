"""Flow-matching scheduler: inference (set_timesteps, step) and the training switch side by side.

Convention: sigma runs from 1 (pure noise) to 0 (clean data), ``timestep = sigma * 1000``,
``x_t = (1 - sigma) * x0 + sigma * noise`` and the model predicts the velocity ``v = noise - x0``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..errors import DiffusmithError

NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class FlowMatchConfig:
    """The subset of ``scheduler_config.json`` that defines the schedule (defaults: Qwen-Image)."""

    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    shift: float = 1.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 0.9
    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    shift_terminal: float | None = 0.02
    time_shift_type: str = "exponential"

    @classmethod
    def from_dict(cls, d: dict) -> FlowMatchConfig:
        unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                   "invert_sigmas", "stochastic_sampling") if d.get(k)]
        if unsupported:
            raise DiffusmithError(f"scheduler option(s) {', '.join(unsupported)} are not supported; "
                                  "set them to false in scheduler_config.json")
        if d.get("time_shift_type", "exponential") not in ("exponential", "linear"):
            raise DiffusmithError(f"unknown time_shift_type {d['time_shift_type']!r}: use exponential or linear")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_file(cls, path: str | Path) -> FlowMatchConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise DiffusmithError(f"scheduler config not found: {path}") from None
        except json.JSONDecodeError as e:
            raise DiffusmithError(f"scheduler config {path} is not valid JSON ({e})") from None


TIMESTEP_SAMPLINGS = ("shifted", "logit_normal", "fixed_shift")
LOSS_WEIGHTINGS = ("none", "bell")


@dataclass
class TimestepSampling:
    """How training picks timesteps and weights the loss (see ``FlowMatchScheduler`` training side)."""

    kind: str = "shifted"
    mu: float | None = None  # "shifted": None = the resolution-dependent mu inference uses
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0  # "fixed_shift"
    weighting: str = "none"

    def __post_init__(self):
        if self.kind not in TIMESTEP_SAMPLINGS:
            raise DiffusmithError(f"unknown timestep sampling {self.kind!r}: use {', '.join(TIMESTEP_SAMPLINGS)}")
        if self.weighting not in LOSS_WEIGHTINGS:
            raise DiffusmithError(f"unknown loss weighting {self.weighting!r}: use {', '.join(LOSS_WEIGHTINGS)}")
        if self.logit_std <= 0 or self.shift <= 0:
            raise DiffusmithError("logit_std and shift must be positive")


def _bell(timesteps: torch.Tensor) -> torch.Tensor:
    return torch.exp(-2 * ((timesteps - 500) / 1000) ** 2)


def shift_mu(image_seq_len: int, cfg: FlowMatchConfig) -> float:
    """Resolution-dependent shift: linear in the image token count (256 -> base_shift, max_len -> max_shift)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return image_seq_len * m + cfg.base_shift - m * cfg.base_image_seq_len


def time_shift(sigmas: np.ndarray, mu: float, kind: str = "exponential") -> np.ndarray:
    """Move sigmas toward 1 (more noise) by an amount set by ``mu``."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return mu / (mu + (1 / sigmas - 1))


def stretch_to_terminal(sigmas: np.ndarray, terminal: float) -> np.ndarray:
    """Rescale ``1 - sigma`` so the last sigma equals ``terminal``. A one-step schedule (sigma 1 only) has
    nothing to stretch and is returned as is (the reference divides by zero there)."""
    one_minus = 1 - sigmas
    if one_minus[-1] == 0:
        return sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


class FlowMatchScheduler:
    """Euler flow-matching scheduler with a ``training`` switch (read by pipeline units)."""

    def __init__(self, config: FlowMatchConfig | None = None):
        self.config = config or FlowMatchConfig()
        self.training = False
        self.sigmas = torch.zeros(0)
        self.timesteps = torch.zeros(0)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> FlowMatchScheduler:
        return cls(FlowMatchConfig.from_file(Path(folder) / "scheduler_config.json"))

    # ---- inference -------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, image_seq_len: int, denoising_strength: float = 1.0,
                      device: torch.device | str | None = None) -> None:
        """Sigmas ``linspace(1, 1/N, N) * strength``, shifted for the resolution, stretched, then a final 0."""
        if num_inference_steps < 1:
            raise DiffusmithError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not 0.0 < denoising_strength <= 1.0:
            raise DiffusmithError(f"denoising_strength must be in (0, 1], got {denoising_strength}")
        cfg = self.config
        # float32 numpy, as the reference computes them, so schedules agree to the last bit
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) * denoising_strength
        sigmas = sigmas.astype(np.float32)
        if cfg.use_dynamic_shifting:
            sigmas = time_shift(sigmas, shift_mu(image_seq_len, cfg), cfg.time_shift_type)
        else:
            sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
        if cfg.shift_terminal:
            sigmas = stretch_to_terminal(sigmas, cfg.shift_terminal)
        sigmas = torch.from_numpy(np.asarray(sigmas)).to(dtype=torch.float32, device=device)
        self.timesteps = sigmas * cfg.num_train_timesteps
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])

    def step(self, velocity: torch.Tensor, index: int, x: torch.Tensor) -> torch.Tensor:
        """One Euler step from ``sigmas[index]`` to ``sigmas[index + 1]`` (in fp32, returned in x's dtype)."""
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        x_next = x.float() + (sigma_next - sigma) * velocity
        return x_next.to(velocity.dtype)

    # ---- training --------------------------------------------------------------------------------
    def training_sigma_grid(self, image_seq_len: int, sampling: TimestepSampling) -> torch.Tensor:
        """The 1000 sigmas of the training schedule ("shifted": the inference shift with ``mu`` from the
        resolution, or ``sampling.mu`` when given, as the incumbent trains with mu = 0.8)."""
        n = self.config.num_train_timesteps
        sigmas = np.linspace(1.0, 1 / n, n).astype(np.float32)
        mu = sampling.mu if sampling.mu is not None else shift_mu(image_seq_len, self.config)
        sigmas = time_shift(sigmas, mu, self.config.time_shift_type)
        if self.config.shift_terminal:
            sigmas = stretch_to_terminal(sigmas, self.config.shift_terminal)
        return torch.from_numpy(np.asarray(sigmas, dtype=np.float32))

    def sample_training_timesteps(self, batch_size: int, image_seq_len: int, sampling: TimestepSampling,
                                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Timesteps (sigma * 1000, shape (B,), float32 on CPU) for a training batch."""
        if sampling.kind == "shifted":
            grid = self.training_sigma_grid(image_seq_len, sampling)
            sigmas = grid[torch.randint(0, len(grid), (batch_size,), generator=generator)]
        elif sampling.kind == "logit_normal":
            normal = torch.randn(batch_size, generator=generator) * sampling.logit_std + sampling.logit_mean
            sigmas = torch.sigmoid(normal)
        else:  # "fixed_shift": uniform sigmas moved toward noise by a constant factor (SD3 style)
            u = torch.rand(batch_size, generator=generator).clamp_min(1e-3)
            sigmas = sampling.shift * u / (1 + (sampling.shift - 1) * u)
        return sigmas * self.config.num_train_timesteps

    def training_weight(self, timesteps: torch.Tensor, image_seq_len: int,
                        sampling: TimestepSampling) -> torch.Tensor:
        """Per-sample loss weight: 1, or the bell ``exp(-2 ((t - 500) / 1000)^2)`` normalised to mean 1
        over the shifted training grid (the incumbent's weighting)."""
        if sampling.weighting == "none":
            return torch.ones_like(timesteps)
        grid = self.training_sigma_grid(image_seq_len, sampling) * self.config.num_train_timesteps
        mean = _bell(grid).mean()
        return _bell(timesteps) / mean

    # ---- both sides ------------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        """``x_t = (1 - sigma) * x0 + sigma * noise`` with ``sigma = timestep / 1000`` (per sample if a tensor)."""
        sigma = torch.as_tensor(timestep, dtype=torch.float32, device=x0.device) / self.config.num_train_timesteps
        sigma = sigma.reshape(-1, *([1] * (x0.ndim - 1))) if sigma.ndim else sigma
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity the model should predict: ``noise - x0``."""
        return noise - x0
