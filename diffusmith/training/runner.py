"""The training loop: setup -> train -> save, over the library's parts (accelerate for devices/DDP).

Checkpoints every ``save_every`` steps hold everything needed to continue exactly (trainable weights,
optimizer, LR schedule, step, RNG states, data position); ``resume="latest"`` picks the newest complete one.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.attention import check_attention_backend, set_attention_backend
from ..core.checkpointing import CHECKPOINTING_MODES, check_checkpointing_interval
from ..core.devices import resolve_device
from ..core.memory import CUDA_GRAPH_MODES, check_block_count, check_compile_mode, uses_cuda_graphs
from ..errors import DiffusmithError, is_finite_number
from ..schedulers.flow_match import TimestepSampling
from .checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, resolve_resume, save_checkpoint
from .data import load_dataset, make_dataloader
from .distributed import DataParallel, make_strategy, sharding_from_environment
from .logs import MetricsLog
from .module import LossSpec, TrainableSpec, TrainingModule
from .optim import make_lr_scheduler, make_optimizer
from .outputs import check_output_folder, claim_output_folder, save_final_weights
from .validation import ValidationSpec, render_validation

logger = logging.getLogger(__name__)
MIXED_PRECISION = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    model: str
    dataset: str
    output: str
    # what trains
    full: bool = False
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_targets: Sequence[str] | None = None
    # data
    height: int | None = None
    width: int | None = None
    max_pixels: int | None = None
    batch_size: int = 1
    caption_dropout: float = 0.0
    repeat: int = 1
    skip_bad_samples: bool = False
    num_workers: int = 0
    # optimisation
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_steps: int | None = None
    epochs: int | None = None
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    timestep_sampling: str = "shifted"
    timestep_mu: float | None = None
    loss_weighting: str = "none"
    # machinery
    save_every: int | None = None
    keep_checkpoints: int | None = None
    resume: str | None = None
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    gradient_checkpointing_offload: bool = False
    gradient_checkpointing_mode: str = "full"
    gradient_checkpointing_interval: int = 1  # checkpoint every N-th block
    block_swap: int | None = None  # blocks whose frozen weights stay on the device; None = no block swap
    fp8_base: bool = False
    compile: bool = False
    compile_mode: str | None = None  # torch.compile's mode (core.memory.COMPILE_MODES); implies compile
    attention_backend: str = "auto"  # core.attention.ATTENTION_BACKENDS
    device: str | None = None
    validation_prompts: Sequence[str] = field(default_factory=tuple)
    validate_every: int | None = None
    validation_steps: int = 20
    validation_cfg_scale: float = 4.0
    allow_pickle: bool = False
    cache: str | None = None
    sharding: str = "none"  # none (data parallel) | fsdp | deepspeed-zero1 | deepspeed-zero2
    sharding_options: dict = field(default_factory=dict)  # e.g. FSDP's offload, from an accelerate config

    @property
    def compiled(self) -> bool:
        """Whether the repeated blocks are compiled (--compile, or a --compile-mode)."""
        return self.compile or self.compile_mode is not None

    def check(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise DiffusmithError(f"unknown --mixed-precision {self.mixed_precision!r}: use no, bf16 or fp16")
        if (self.max_steps is None) == (self.epochs is None):
            raise DiffusmithError("pass exactly one of --max-steps or --epochs")
        for name in ("max_steps", "epochs", "batch_size", "gradient_accumulation", "save_every", "validate_every",
                     "keep_checkpoints", "validation_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise DiffusmithError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name, value, meaning in (("max_grad_norm", self.max_grad_norm, " (0 turns clipping off)"),
                                     ("validation_cfg_scale", self.validation_cfg_scale, "")):
            if not is_finite_number(value) or value < 0:
                raise DiffusmithError(f"--{name.replace('_', '-')} must be a number >= 0{meaning}, got {value!r}")
        if self.gradient_checkpointing_mode not in CHECKPOINTING_MODES:
            raise DiffusmithError(f"unknown --gradient-checkpointing-mode {self.gradient_checkpointing_mode!r}: "
                                  f"use {' or '.join(CHECKPOINTING_MODES)}")
        if self.gradient_checkpointing_mode != "full" and not (self.gradient_checkpointing
                                                              or self.gradient_checkpointing_offload):
            raise DiffusmithError("--gradient-checkpointing-mode needs --gradient-checkpointing")
        interval = check_checkpointing_interval(self.gradient_checkpointing_interval,
                                                "--gradient-checkpointing-interval")
        if interval != 1 and not (self.gradient_checkpointing or self.gradient_checkpointing_offload):
            raise DiffusmithError("--gradient-checkpointing-interval needs --gradient-checkpointing")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise DiffusmithError(f"unknown --optimizer {self.optimizer!r}: use adamw or adamw8bit")
        if self.validate_every and not self.validation_prompts:
            raise DiffusmithError("--validate-every needs at least one --validation-prompt")
        check_attention_backend(self.attention_backend)
        if self.block_swap is not None:
            check_block_count(self.block_swap)
        if self.full and self.block_swap is not None:
            raise DiffusmithError("block swap keeps frozen weights off the GPU; it does not work with --full")
        if self.full and self.fp8_base:
            raise DiffusmithError("--fp8-base stores the frozen weights in fp8; with --full every weight trains")
        if self.compile_mode is not None:
            check_compile_mode(self.compile_mode)
        if self.compile_mode in CUDA_GRAPH_MODES:
            # block swap moves the weights a graph replays; torch's CUDA graphs break under activation
            # checkpointing's recomputation (pytorch/pytorch#154306, open)
            for flag, on in (("--block-swap", self.block_swap is not None),
                             ("--gradient-checkpointing", self.gradient_checkpointing
                              or self.gradient_checkpointing_offload)):
                if on:
                    raise DiffusmithError(f"--compile-mode {self.compile_mode} (CUDA graphs) does not work with "
                                          f"{flag}; use --compile-mode default, or drop {flag}")
        if self.sharding != "none":
            for flag, on in (("--block-swap", self.block_swap is not None), ("--fp8-base", self.fp8_base),
                             ("--compile", self.compiled)):
                if on:
                    raise DiffusmithError(f"{flag} does not work with --sharding {self.sharding} yet; use one "
                                          "of them")
            if self.mixed_precision == "fp16" and self.sharding == "fsdp":
                raise DiffusmithError("--sharding fsdp runs with --mixed-precision bf16 or no, not fp16")

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its resume."""
        keys = ("model", "dataset", "full", "lora_rank", "lora_alpha", "lora_targets", "height", "width",
                "max_pixels", "batch_size", "gradient_accumulation", "seed", "repeat", "caption_dropout")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keys}


class _StopFlag:
    """Ctrl-C asks for a clean stop at the next step boundary; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            logger.warning("stopping after this step (a checkpoint is saved); press Ctrl-C again to abort")

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def build_accelerator(config: TrainConfig):
    """accelerate's Accelerator for this run; an FSDP/DeepSpeed accelerate config becomes
    ``config.sharding`` (diffusmith shards the model itself; accelerate only runs the processes)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    sharding = sharding_from_environment(config.sharding)
    config.sharding = sharding["kind"]
    config.sharding_options = {**config.sharding_options, **{k: v for k, v in sharding.items() if k != "kind"}}
    config.check()
    launched_with = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched_with and launched_with != config.mixed_precision:
        logger.warning("the accelerate config says mixed_precision %s but --mixed-precision is %s; using %s",
                       launched_with, config.mixed_precision, config.mixed_precision)
    device = resolve_device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # accelerate keeps one state per process; a second run in the same process (a notebook, the tests)
    # may ask for another precision
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=device.type == "cpu")
    if config.sharding != "none" and accelerator.num_processes == 1:
        raise DiffusmithError(f"--sharding {config.sharding} splits the model over several processes; add "
                              "--num-processes N (or start them with accelerate launch), or drop --sharding")
    return accelerator


def build_pipeline(config: TrainConfig, device: torch.device, models=None):
    from ..pipelines.qwen_image import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(config.model, device=device,
                                             torch_dtype=MIXED_PRECISION[config.mixed_precision],
                                             allow_pickle=config.allow_pickle, models=models)


def apply_memory_modes(config: TrainConfig, module: TrainingModule, device: torch.device) -> None:
    """--fp8-base, --block-swap and --compile on the trained model, in that order. With either of the
    first two the pipeline was loaded in CPU memory (so the full-precision model never has to fit on the
    device); everything but the swapped block weights moves to the device here."""
    from ..core import memory

    pipe, model = module.pipe, module.model
    if config.fp8_base:
        memory.enable_fp8_storage(model)
    if config.block_swap is not None:
        memory.enable_block_swap(model, device, config.block_swap)
    if config.block_swap is not None or config.fp8_base:
        # every process loaded the same frozen weights: data-parallel must not broadcast them (the swapped
        # ones live in host memory, and NCCL/gloo cannot send fp8)
        frozen = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if not t.requires_grad]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    for other in pipe.models().values():
        if other is not model or config.block_swap is None:
            other.to(device)
    pipe.device = device
    if config.compiled:
        memory.compile_repeated_blocks(model, mode=config.compile_mode)


def _pipeline_class():
    from ..pipelines.qwen_image import QwenImagePipeline

    return QwenImagePipeline


def cache_options(config: TrainConfig) -> dict:
    return {"height": config.height, "width": config.width, "max_pixels": config.max_pixels}


def _frozen_folders(model_root: Path, trainable_folder: str) -> list[str]:
    return sorted(p.name for p in model_root.iterdir() if p.is_dir() and p.name != trainable_folder)


def cache_features(config: TrainConfig, output: str | Path) -> Path:
    """``diffusmith cache``: run the frozen units over the dataset once and store what training needs."""
    from ..core.hub import resolve_model_path
    from .cache import build_cache

    dataset = load_dataset(config.dataset, height=config.height, width=config.width, max_pixels=config.max_pixels,
                           skip_bad_samples=config.skip_bad_samples, seed=config.seed)
    logger.info("%s", dataset.describe())
    cls = _pipeline_class()
    frozen = [m for m in cls.model_names if m != cls.trainable_model]
    pipe = build_pipeline(config, resolve_device(config.device or ("cuda" if torch.cuda.is_available() else "cpu")),
                          models=frozen)
    root = resolve_model_path(config.model)
    return build_cache(pipe, dataset, output, trainable=[cls.trainable_model], model_root=root,
                       cached_folders=_frozen_folders(root, cls.component_folders[cls.trainable_model]),
                       options=cache_options(config))


def batch_stream(loader, start_epoch: int, start_batches_done: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, batches done in that epoch after this one, batch), endlessly across epochs."""
    sampler, epoch = loader.batch_sampler, start_epoch
    sampler.load_state_dict({**sampler.state_dict(), "epoch": epoch, "batches_done": start_batches_done})
    done = start_batches_done
    while True:
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            done += 1
            yield epoch, done, batch
        epoch, done = epoch + 1, 0
        sampler.set_epoch(epoch)


def train(config: TrainConfig) -> Path:
    """Run (or resume) a training run; returns the path of the final weights."""
    config.check()
    set_attention_backend(config.attention_backend)
    out = Path(config.output)
    accelerator = build_accelerator(config)
    main = accelerator.is_main_process
    if main:  # one process decides; the folder is claimed once the run is set up (below)
        check_output_folder(out, config.fingerprint(), resume=config.resume)
    accelerator.wait_for_everyone()

    dataset = load_dataset(config.dataset, height=config.height, width=config.width, max_pixels=config.max_pixels,
                           caption_dropout=config.caption_dropout, repeat=config.repeat,
                           skip_bad_samples=config.skip_bad_samples, seed=config.seed)
    logger.info("%s", dataset.describe())
    torch.manual_seed(config.seed)
    cache, loader_dataset = None, dataset
    # fp8 conversion and block swap start from CPU memory; apply_memory_modes moves the models over
    load_device = torch.device("cpu") if config.block_swap is not None or config.fp8_base else accelerator.device
    if config.cache:
        from ..core.hub import resolve_model_path
        from .cache import CachedDataset, FeatureCache

        cls = _pipeline_class()
        root = resolve_model_path(config.model)
        cache = FeatureCache(config.cache)
        cache.check(dataset, root, _frozen_folders(root, cls.component_folders[cls.trainable_model]),
                    cache_options(config), MIXED_PRECISION[config.mixed_precision])
        loader_dataset = CachedDataset(dataset)
        # the frozen models are not loaded at all, unless validation samples need the whole pipeline
        models = None if config.validate_every else [cls.trainable_model]
        pipe = build_pipeline(config, load_device, models=models)
    else:
        pipe = build_pipeline(config, load_device)
    sampling = TimestepSampling(kind=config.timestep_sampling, mu=config.timestep_mu,
                                weighting=config.loss_weighting)
    module = TrainingModule(
        pipe,
        TrainableSpec(full=config.full, rank=config.lora_rank, alpha=config.lora_alpha,
                      targets=config.lora_targets),
        LossSpec(sampling=sampling, use_gradient_checkpointing=config.gradient_checkpointing,
                 use_gradient_checkpointing_offload=config.gradient_checkpointing_offload,
                 gradient_checkpointing_mode=config.gradient_checkpointing_mode,
                 gradient_checkpointing_interval=config.gradient_checkpointing_interval),
        cache=cache,
    )
    apply_memory_modes(config, module, accelerator.device)
    loader = make_dataloader(loader_dataset, config.batch_size, config.seed, num_workers=config.num_workers,
                             num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    steps_per_epoch = max(1, len(loader.batch_sampler) // config.gradient_accumulation)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    strategy = make_strategy(config.sharding, **config.sharding_options)
    optimizer = strategy.setup(
        accelerator, module,
        lambda params: make_optimizer(params, config.learning_rate, use_8bit=config.optimizer == "adamw8bit"),
        device_placement=config.block_swap is None, batch_size=config.batch_size,
        gradient_accumulation=config.gradient_accumulation, max_grad_norm=config.max_grad_norm,
        mixed_precision=config.mixed_precision)
    if config.gradient_accumulation > 1 and uses_cuda_graphs(module.model):
        # the CUDA graphs' gradient outputs live in memory the next micro-batch's replay reuses
        strategy.keep_gradient_buffers()
    # the LR scheduler and the data loader stay ours: accelerate's wrappers would step / shard them again
    lr_scheduler = make_lr_scheduler(optimizer, config.lr_schedule, config.warmup_steps, total_steps)

    step, epoch, batches_done = 0, 0, 0
    checkpoint = resolve_resume(out, config.resume) if config.resume else None
    if checkpoint is not None:
        loaded = load_checkpoint(checkpoint, optimizer=strategy.checkpoint_optimizer(), lr_scheduler=lr_scheduler,
                                 rank=accelerator.process_index, num_processes=accelerator.num_processes,
                                 optimizer_per_rank=strategy.optimizer_per_rank)
        module.load_trainable_state_dict(loaded.trainable)
        step, epoch = loaded.step, loaded.epoch
        batches_done = loaded.data_state["batches_done"]
        logger.info("resumed from %s at step %d", checkpoint, step)
    else:
        torch.manual_seed(config.seed + accelerator.process_index)  # different noise on each process

    validation = ValidationSpec(prompts=list(config.validation_prompts), every=config.validate_every,
                                height=config.height or 512, width=config.width or 512,
                                steps=config.validation_steps, cfg_scale=config.validation_cfg_scale,
                                seed=config.seed)
    if main:  # set up without a refusal: from here on the folder is this run's
        claim_output_folder(out, config.fingerprint())
    metrics = MetricsLog(out / "logs", resume_step=step, enabled=main)
    stream = batch_stream(loader, epoch, batches_done)

    def save(at_step: int) -> Path | None:
        accelerator.wait_for_everyone()
        path = save_checkpoint(out, at_step, trainable=module.trainable_state_dict(),
                               optimizer=strategy.checkpoint_optimizer(), lr_scheduler=lr_scheduler, epoch=epoch,
                               data_state={"epoch": epoch, "batches_done": batches_done},
                               extra={"config": config.fingerprint()}, is_main_process=main,
                               rank=accelerator.process_index, barrier=accelerator.wait_for_everyone,
                               num_processes=accelerator.num_processes,
                               optimizer_per_rank=strategy.optimizer_per_rank)
        if main and config.keep_checkpoints:
            prune_checkpoints(out, config.keep_checkpoints)
        return path

    progress = tqdm(total=total_steps, initial=step, disable=not main, desc="train", unit="step")
    with _StopFlag() as stop:
        while step < total_steps:
            started = time.perf_counter()
            loss_value = 0.0
            for micro in range(config.gradient_accumulation):
                epoch, batches_done, batch = next(stream)
                with strategy.no_sync(last_micro_batch=micro == config.gradient_accumulation - 1):
                    loss = strategy.forward(batch)
                    # the step's one wait for the device: checked before backward, which under DeepSpeed
                    # also steps the optimizer
                    value = loss.detach().float().item()
                    if not math.isfinite(value):
                        good = latest_checkpoint(out)
                        raise DiffusmithError(
                            f"the loss became {value} at step {step + 1}: training stopped; the last good "
                            f"checkpoint is {good or 'none'}; lower --learning-rate or check the data")
                    strategy.backward(loss, config.gradient_accumulation)
                loss_value += value / config.gradient_accumulation
            strategy.step(config.max_grad_norm)
            lr_scheduler.step()
            step += 1
            seconds = time.perf_counter() - started
            lr = lr_scheduler.get_last_lr()[0]
            metrics.log(step, epoch, loss_value, lr, seconds)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", s_it=f"{seconds:.2f}")
            progress.update(1)
            if config.save_every and step % config.save_every == 0 and step < total_steps:
                save(step)
            # a sharded model samples only with every process taking part; a replicated one on the main one
            if validation.due(step) and (main or not strategy.replicated):
                _validate(pipe, module, validation, step, out, accelerator, write=main)
            if stop.requested:
                path = save(step)
                progress.close()
                metrics.close()
                raise KeyboardInterrupt(f"stopped at step {step}; checkpoint {path}")
    progress.close()
    metrics.close()
    if config.save_every:
        save(step)
    check_replicas_agree(accelerator, module, strategy)
    final = save_final_weights(out, module, is_main_process=main)
    accelerator.wait_for_everyone()
    return final


def check_replicas_agree(accelerator, module: TrainingModule, strategy: DataParallel) -> None:
    """Data-parallel processes must end with the same weights; a silent divergence would make the saved
    result depend on which process wrote it. (FSDP holds one copy, split over the processes.)"""
    if accelerator.num_processes == 1 or not strategy.replicated:
        return
    params = module.trainable_parameters().values()
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(accelerator.device)
    sums = accelerator.gather(checksum).cpu()
    if not torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-9, atol=0):
        raise DiffusmithError(f"data-parallel processes ended with different weights ({sums.tolist()}); "
                              "please report this with your launch command")
    logger.info("all %d processes hold the same weights", accelerator.num_processes)


def _validate(pipe, module: TrainingModule, spec: ValidationSpec, step: int, out: Path, accelerator,
              write: bool = True) -> None:
    module.model.eval()
    try:
        with accelerator.autocast():
            path = render_validation(pipe, spec, step, out / "samples", write=write)
        if write:
            logger.info("validation samples: %s", path)
    finally:
        module.model.train()

