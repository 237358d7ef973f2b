"""How the processes of one run share the work: data parallel, FSDP, or DeepSpeed ZeRO (``--sharding``).

Every process runs the pipeline's units on its own batches; what differs is who holds which weights:

- ``none``: plain data parallel (accelerate's DDP). Every process holds every weight and the whole optimizer
  state; gradients are averaged.
- ``fsdp``: torch FSDP2 (``fully_shard``) on each repeated block and on the model: weights, gradients and
  optimizer state are split over the processes, and a block's weights are gathered just before it runs
  (``reshard_after_forward=False`` keeps them gathered until its backward: ZeRO-2 style, more memory, less
  traffic). Optionally everything sharded waits in CPU memory (``offload``).
- ``deepspeed-zero1`` / ``deepspeed-zero2``: DeepSpeed's ZeRO optimizer: the optimizer state (stage 1) and
  the gradients (stage 2) are split; weights stay whole on every process.

``accelerate launch --config_file configs/accelerate/{fsdp,deepspeed_zero2}.yaml`` asks for the same thing
through accelerate's environment variables: :func:`sharding_from_environment` reads them and hides them
from accelerate, which then only starts the processes and the process group (its own FSDP/DeepSpeed
wrappers would shard the model a second time, and accelerate runs neither on CPU).

Checkpoints: the trainable weights are gathered whole, so ``trainable.safetensors``, ``lora.safetensors`` and
``model.safetensors`` look the same whatever the strategy; a sharded optimizer state is saved per process
(``optimizer-<rank>.safetensors``), so such a run resumes with the same number of processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..core.blocks import repeated_blocks
from ..errors import DiffusmithError

logger = logging.getLogger(__name__)
SHARDING = ("none", "fsdp", "deepspeed-zero1", "deepspeed-zero2")
_TRUE = ("true", "1", "yes")


def end_process_group() -> None:
    """Close the process group a launcher (accelerate launch, torchrun) opened, once the process's work is
    done: a process that exits with it still open can abort at exit ("terminate called without an active
    exception") after everything was saved. For the command line, which owns its process; a no-op when
    no group is open."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a tensor FSDP split over the processes (a DTensor)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support shards nothing
        return False
    return isinstance(tensor, DTensor)


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP) tensor gathered whole; any other tensor as it is. Every process must call it."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor every process holds) cut the way ``param`` is sharded; as it is when
    ``param`` is not sharded."""
    if not is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)  # every process has the data: no communication


def sharding_from_environment(requested: str = "none", environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The sharding an accelerate config asked for (``accelerate launch --config_file ...`` exports it as
    ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED`` and friends), merged with ``--sharding``. The
    variables are switched off afterwards, so accelerate itself only runs the processes.

    Returns ``{"kind": one of SHARDING, ...options}``."""
    env = os.environ if environ is None else environ
    if requested not in SHARDING:
        raise DiffusmithError(f"unknown --sharding {requested!r}: use one of {', '.join(SHARDING)}")
    found: dict[str, Any] = {"kind": "none"}
    if env.get("ACCELERATE_USE_FSDP", "false").lower() in _TRUE:
        if env.get("FSDP_VERSION", "2") != "2":
            logger.warning("the accelerate config asks for FSDP version %s; diffusmith shards with FSDP2",
                           env.get("FSDP_VERSION"))
        found = {"kind": "fsdp",
                 "reshard_after_forward": env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in _TRUE,
                 "offload": env.get("FSDP_OFFLOAD_PARAMS", "false").lower() in _TRUE}
        env["ACCELERATE_USE_FSDP"] = "false"
    elif env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in _TRUE:
        if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none").lower() != "none":
            raise DiffusmithError("a DeepSpeed JSON config file is not read by diffusmith; give zero_stage and "
                                  "offload_optimizer_device in the accelerate config (see configs/accelerate/)")
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        if stage not in ("1", "2"):
            raise DiffusmithError(f"DeepSpeed ZeRO stage {stage} is not supported: use stage 1 or 2, or "
                                  "configs/accelerate/fsdp.yaml to shard the weights too")
        found = {"kind": f"deepspeed-zero{stage}",
                 "offload_optimizer": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower()}
        env["ACCELERATE_USE_DEEPSPEED"] = "false"
    if found["kind"] == "none":
        return {"kind": requested}
    if requested not in ("none", found["kind"]):
        raise DiffusmithError(f"--sharding {requested} contradicts the accelerate config, which asks for "
                              f"{found['kind']}; drop one of them")
    return found


def make_strategy(kind: str = "none", **options: Any) -> DataParallel:
    if kind == "none":
        return DataParallel()
    if kind == "fsdp":
        return FullyShardedDataParallel(**options)
    if kind.startswith("deepspeed-zero"):
        return DeepSpeedZero(stage=int(kind[-1]), **options)
    raise DiffusmithError(f"unknown --sharding {kind!r}: use one of {', '.join(SHARDING)}")


class DataParallel:
    """Every process holds the whole model (accelerate's DDP); the base the sharded strategies follow."""

    name = "none"
    optimizer_per_rank = False  # the optimizer state is the same on every process: the main one saves it
    replicated = True  # every process holds the same trainable weights (checked at the end of a run)
    _set_to_none = True  # zero_grad drops the gradients (False after keep_gradient_buffers)

    def setup(self, accelerator, module: nn.Module, make_optimizer: Callable[[Iterable[nn.Parameter]], Any],
              *, device_placement: bool = True, **_: Any) -> torch.optim.Optimizer:
        """Wrap ``module`` and build its optimizer (``make_optimizer(trainable parameters)``); returns the
        plain torch optimizer (for the LR scheduler and checkpoints)."""
        self.accelerator, self.module = accelerator, module
        optimizer = make_optimizer(module.trainable_parameters().values())
        # with block swap, moving the module to the device would bring every swapped weight back onto it
        self.wrapped, self.optimizer = accelerator.prepare(module, optimizer,
                                                           device_placement=[device_placement, True])
        return optimizer

    def forward(self, batch: dict) -> torch.Tensor:
        return self.wrapped(batch)

    def no_sync(self, last_micro_batch: bool):
        """Skip the gradient exchange on all but the last micro-batch of an accumulated step."""
        return contextlib.nullcontext() if last_micro_batch else self.accelerator.no_sync(self.wrapped)

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        self.accelerator.backward(loss / accumulation)

    def keep_gradient_buffers(self) -> None:
        """Give each trainable parameter a zeroed ``.grad`` that lives for the whole run: backward adds into
        it, where it would otherwise take over the tensor backward produced (needed when that tensor's memory
        is reused by the next micro-batch: CUDA graphs with gradient accumulation)."""
        for param in self.module.trainable_parameters().values():
            param.grad = torch.zeros_like(param)
        self._set_to_none = False

    def step(self, max_grad_norm: float) -> None:
        if max_grad_norm:
            self.accelerator.clip_grad_norm_(list(self.module.trainable_parameters().values()), max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self._set_to_none)

    def checkpoint_optimizer(self) -> Any:
        """What a checkpoint saves the optimizer state of (``state_dict`` / ``load_state_dict``)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)


class FullyShardedDataParallel(DataParallel):
    """torch FSDP2 over the model's repeated blocks, compute under accelerate's autocast (so the numbers are
    those of data parallel: fp32 trainable weights, bf16/fp16 compute)."""

    name = "fsdp"
    optimizer_per_rank = True
    replicated = False

    def __init__(self, reshard_after_forward: bool = True, offload: bool = False):
        self.reshard_after_forward = reshard_after_forward
        self.offload = offload

    def setup(self, accelerator, module: nn.Module, make_optimizer, **_: Any) -> torch.optim.Optimizer:
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
        except ImportError as error:
            raise DiffusmithError(f"--sharding fsdp needs torch >= 2.6 (FSDP2); this is {torch.__version__}") from error

        self.accelerator, self.module = accelerator, module
        mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        options = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward,
                   "offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if self.offload
                   else OffloadPolicy()}
        model = module.model
        for block in repeated_blocks(model):
            fully_shard(block, **options)
        fully_shard(model, **options)
        # sharding replaced the parameters: the optimizer is built over the new (sharded) ones
        self.optimizer = make_optimizer(module.trainable_parameters().values())
        logger.info("FSDP over %d processes: %d blocks sharded%s", accelerator.num_processes,
                    len(repeated_blocks(model)), ", offloaded to CPU" if self.offload else "")
        return self.optimizer

    def forward(self, batch: dict) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.module(batch)

    @contextlib.contextmanager
    def no_sync(self, last_micro_batch: bool) -> Iterator[None]:
        self.module.model.set_requires_gradient_sync(last_micro_batch)
        try:
            yield
        finally:
            self.module.model.set_requires_gradient_sync(True)

    def step(self, max_grad_norm: float) -> None:
        if max_grad_norm:  # FSDP2 gradients are sharded tensors: torch's clipping takes the global norm
            torch.nn.utils.clip_grad_norm_(list(self.module.trainable_parameters().values()), max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def checkpoint_optimizer(self) -> Any:
        return _LocalShards(self.optimizer)


class _LocalShards:
    """An FSDP optimizer's state with each sharded tensor as this process's plain local part (what a
    safetensors file can hold), and back."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        from torch.distributed.tensor import DTensor

        state = self.optimizer.state_dict()
        return {**state, "state": {index: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in s.items()}
                                   for index, s in state["state"].items()}}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.tensor import DTensor

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        restored = {}
        for index, values in state["state"].items():
            param = params[int(index)]
            restored[index] = {
                k: DTensor.from_local(v.to(param.device), param.device_mesh, param.placements, run_check=False,
                                      shape=param.shape, stride=param.stride())
                if isinstance(param, DTensor) and isinstance(v, torch.Tensor) and v.dim() > 0 else v
                for k, v in values.items()}
        self.optimizer.load_state_dict({**state, "state": restored})


class DeepSpeedZero(DataParallel):
    """DeepSpeed's ZeRO stage 1/2 optimizer around our optimizer (``pip install deepspeed``). DeepSpeed runs
    the model in bf16/fp16 itself under mixed precision, with fp32 master weights in the optimizer."""

    optimizer_per_rank = True

    def __init__(self, stage: int = 2, offload_optimizer: str = "none"):
        if stage not in (1, 2):
            raise DiffusmithError(f"DeepSpeed ZeRO stage {stage} is not supported: use 1 or 2 (or --sharding fsdp)")
        if offload_optimizer not in ("none", "cpu"):
            raise DiffusmithError(f"DeepSpeed offload_optimizer_device {offload_optimizer!r}: use none or cpu")
        self.stage, self.offload_optimizer = stage, offload_optimizer
        self.name = f"deepspeed-zero{stage}"

    def setup(self, accelerator, module: nn.Module, make_optimizer, *, batch_size: int = 1,
              gradient_accumulation: int = 1, max_grad_norm: float = 0.0, mixed_precision: str = "no",
              **_: Any) -> torch.optim.Optimizer:
        try:
            import deepspeed
        except ImportError as error:
            raise DiffusmithError("--sharding deepspeed-* needs DeepSpeed: pip install deepspeed") from error

        self.accelerator, self.module = accelerator, module
        optimizer = make_optimizer(module.trainable_parameters().values())
        zero: dict[str, Any] = {"stage": self.stage}
        if self.offload_optimizer == "cpu":
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        config = {
            "train_micro_batch_size_per_gpu": batch_size,
            "gradient_accumulation_steps": gradient_accumulation,
            "train_batch_size": batch_size * gradient_accumulation * accelerator.num_processes,
            "gradient_clipping": float(max_grad_norm or 0.0),
            "zero_optimization": zero,
            "bf16": {"enabled": mixed_precision == "bf16"},
            "fp16": {"enabled": mixed_precision == "fp16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                                                 dist_init_required=False)
        logger.info("DeepSpeed ZeRO stage %d over %d processes", self.stage, accelerator.num_processes)
        return optimizer

    def forward(self, batch: dict) -> torch.Tensor:
        return self.engine(batch)

    def no_sync(self, last_micro_batch: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces at its own accumulation boundary

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        self.engine.backward(loss / accumulation, scale_wrt_gas=False)
        self.engine.step()  # steps the optimizer (clipping first) only at the accumulation boundary

    def step(self, max_grad_norm: float) -> None:
        pass  # done by the engine in backward

    def checkpoint_optimizer(self) -> Any:
        return _ZeroState(self.optimizer)


class _ZeroState:
    """A ZeRO optimizer's per-process state without the two entries a checkpoint cannot hold: the loss
    scaler object (kept as its plain attributes) and the parameter slice table of DeepSpeed's universal
    checkpoints (rebuilt by DeepSpeed)."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        state = dict(self.optimizer.state_dict())
        scaler = state.pop("loss_scaler", None)
        state.pop("param_slice_mappings", None)
        state["loss_scaler"] = {k: v for k, v in vars(scaler).items()
                                if v is None or isinstance(v, (bool, int, float, str))} if scaler else {}
        return state

    def load_state_dict(self, state: dict) -> None:
        import torch.distributed as dist

        state = dict(state)
        for key, value in state.pop("loss_scaler", {}).items():
            setattr(self.optimizer.loss_scaler, key, value)
        state["loss_scaler"] = self.optimizer.loss_scaler
        per_rank: list[dict | None] = [None] * dist.get_world_size()
        per_rank[dist.get_rank()] = state
        self.optimizer.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)
