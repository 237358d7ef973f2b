"""What is trained and how the loss is taken: the pipeline's own units, in training mode.

``TrainingModule.forward(batch)`` runs ``pipe.units`` exactly as inference does, but with
``pipe.scheduler.training = True`` and CFG off (so the input-image unit returns clean ``input_latents`` and
pure ``noise``), then noises the latents at a sampled timestep, calls ``pipe.model_fn`` and returns the
flow-matching loss on its output. There is no second copy of the preprocessing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.compilation import begin_step
from ..core.lora import inject_lora
from ..errors import DiffusmithError
from ..pipelines.base import BasePipeline, run_unit
from ..schedulers.flow_match import TimestepSampling
from .cache import FeatureCache, apply_cached_unit
from .distributed import shard_like, whole_tensor

logger = logging.getLogger(__name__)


@dataclass
class TrainableSpec:
    """Which weights train: a LoRA of ``rank`` on ``targets`` (None = the model's default list), or all."""

    full: bool = False
    rank: int = 16
    alpha: float | None = None  # None = rank (scale 1)
    targets: Sequence[str] | None = None

    def __post_init__(self):
        if not self.full and (not isinstance(self.rank, int) or self.rank < 1):
            raise DiffusmithError(f"--lora-rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and self.alpha <= 0:
            raise DiffusmithError(f"--lora-alpha must be positive, got {self.alpha}")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class LossSpec:
    sampling: TimestepSampling = field(default_factory=TimestepSampling)
    use_gradient_checkpointing: bool = False
    use_gradient_checkpointing_offload: bool = False
    gradient_checkpointing_mode: str = "full"  # "full": recompute whole blocks; "selective": only cheap ops
    gradient_checkpointing_interval: int = 1  # checkpoint every N-th block


class TrainingModule(nn.Module):
    """Owns the trainable model (registered, so DDP/FSDP see its parameters); the frozen models stay in
    the pipeline, in eval mode and without gradients."""

    def __init__(self, pipe: BasePipeline, trainable: TrainableSpec | None = None, loss: LossSpec | None = None,
                 cache: FeatureCache | None = None):
        super().__init__()
        self.pipe = pipe
        self.cache = cache
        self.spec = trainable or TrainableSpec()
        self.loss_spec = loss or LossSpec()
        self.model_name = pipe.lora_target
        self.model: nn.Module = getattr(pipe, self.model_name)
        for model in pipe.models().values():
            model.requires_grad_(False).eval()
        unused = list(getattr(self.model, "modules_without_gradient", lambda: [])())
        if self.spec.full:
            self.model.float()  # trainable weights in fp32; compute may be autocast to bf16/fp16
            self.model.requires_grad_(True)
            for name in unused:  # never used in the loss: frozen, so data-parallel needs no special flag
                self.model.get_submodule(name).requires_grad_(False)
            self.lora_modules: list[str] = []
        else:
            targets = list(self.spec.targets or self.model.default_lora_targets)
            self.lora_modules = inject_lora(self.model, targets, rank=self.spec.rank, alpha=self.spec.lora_alpha,
                                            exclude=unused)
        self.model.train()
        n = sum(p.numel() for p in self.trainable_parameters().values())
        logger.info("training %s: %s, %.2fM trainable parameters", self.model_name,
                    "full" if self.spec.full else f"LoRA rank {self.spec.rank} on {len(self.lora_modules)} modules",
                    n / 1e6)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights by name, whole (gathered when FSDP shards them: every process must call
        this then), detached."""
        return {n: whole_tensor(p.detach()) for n, p in self.trainable_parameters().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable_parameters()
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise DiffusmithError(f"checkpoint weights do not fit this run: {len(missing)} missing "
                                  f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}); "
                                  "resume with the same --lora-* / --full options")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(shard_like(value, params[name]))

    # ---- the loss ----------------------------------------------------------------------------------
    def prepare_inputs(self, batch: dict[str, Any]) -> tuple[dict, dict]:
        """Run the pipeline's units in training mode (CFG off). Units whose models are all frozen run
        without autograd: they are exactly what inference runs, and nothing in them trains."""
        pipe, cache = self.pipe, self.cache
        shared = dict(pipe.default_inputs())
        shared.update({k: v for k, v in batch.items() if k not in ("prompt",)})
        shared.update({"height": batch["height"][0], "width": batch["width"][0], "seed": None,
                       "batch_size": len(batch["height"])})
        posi, nega = ({"prompt": list(batch["prompt"])} if "prompt" in batch else {}), {}
        cached = cache.values(batch["cache_index"], batch["caption_dropped"], pipe.device) if cache else {}
        pipe.scheduler.training = True
        try:
            for unit in pipe.units:
                if cache is not None and unit.name in cache.plan.cached_units:
                    apply_cached_unit(cache.plan, unit, cached, shared, posi)
                    continue
                trains = self.model_name in unit.onload_model_names
                with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
                    shared, posi, nega = run_unit(pipe, unit, shared, posi, nega, cfg=False)
        finally:
            pipe.scheduler.training = False
        return shared, posi

    def loss_from_inputs(self, shared: dict, posi: dict) -> torch.Tensor:
        """Flow-matching loss for prepared inputs: ``|| model_fn(x_t, t) - (noise - x0) ||^2``, weighted."""
        pipe, spec = self.pipe, self.loss_spec
        x0, noise = shared["input_latents"], shared["noise"]
        if x0 is None:
            raise DiffusmithError("training needs an input image per sample (the dataset's image column)")
        seq_len = (x0.shape[-2] // 2) * (x0.shape[-1] // 2)
        timestep_cpu = pipe.scheduler.sample_training_timesteps(x0.shape[0], seq_len, spec.sampling)
        # the weight comes from the CPU copy: no device sync between forward and backward
        weight = pipe.scheduler.training_weight(timestep_cpu, seq_len, spec.sampling)
        timestep = timestep_cpu.to(x0.device, non_blocking=True)
        x_t = pipe.scheduler.add_noise(x0, noise, timestep)
        inputs = {**shared, **posi, "latents": x_t}
        begin_step(self.model)  # one step of CUDA graphs (a no-op unless compiled with them)
        velocity = pipe.model_fn(self.model, **inputs, timestep=timestep,
                                 use_gradient_checkpointing=spec.use_gradient_checkpointing,
                                 use_gradient_checkpointing_offload=spec.use_gradient_checkpointing_offload,
                                 gradient_checkpointing_mode=spec.gradient_checkpointing_mode,
                                 gradient_checkpointing_interval=spec.gradient_checkpointing_interval)
        target = pipe.scheduler.training_target(x0.float(), noise.float())
        per_sample = (velocity.float() - target).pow(2).mean(dim=tuple(range(1, target.ndim)))
        weight = weight.to(per_sample.device, non_blocking=True)
        return (per_sample * weight).mean()

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        shared, posi = self.prepare_inputs(batch)
        return self.loss_from_inputs(shared, posi)
