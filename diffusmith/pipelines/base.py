"""Pipeline framework: units that turn named inputs into named outputs, and the runner that calls them.

A unit declares what it reads (``input_params``), what it writes (``output_params``) and which models it
needs on the device (``onload_model_names``). It runs in one of three modes:

- shared (default): reads and writes the inputs shared by both CFG sides;
- separate per CFG side (``input_params_posi`` / ``input_params_nega``): runs once for the positive side and,
  when CFG is on, once for the negative side; each call maps process-argument names to input names;
- take-over (``take_over=True``): receives the three dicts and returns them (for units that must see all).

Training runs the very same units with ``pipe.scheduler.training`` set and CFG off.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..core.compilation import CUDA_GRAPH_MODES, compile_repeated_blocks
from ..core.lora import apply_lora, read_lora
from ..core.offload import ModelPlacer, OffloadMode
from ..errors import DiffusmithError, is_finite_number

logger = logging.getLogger(__name__)


class PipelineUnit:
    """One preprocessing step of a pipeline. Subclasses implement ``process(pipe, **inputs) -> dict``."""

    def __init__(
        self,
        separate_cfg: bool = False,
        take_over: bool = False,
        input_params: Sequence[str] = (),
        output_params: Sequence[str] = (),
        input_params_posi: dict[str, str] | None = None,
        input_params_nega: dict[str, str] | None = None,
        onload_model_names: Sequence[str] = (),
    ):
        self.separate_cfg = separate_cfg or bool(input_params_posi or input_params_nega)
        self.take_over = take_over
        self.input_params = tuple(input_params or ())
        self.output_params = tuple(output_params or ())
        self.input_params_posi = dict(input_params_posi or {})
        self.input_params_nega = dict(input_params_nega or {})
        self.onload_model_names = tuple(onload_model_names or ())

    @property
    def name(self) -> str:
        return type(self).__name__

    def process(self, pipe: BasePipeline, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{self.name} must implement process()")


def check_generation_inputs(*, prompt: object, negative_prompt: object, cfg_scale: object, seed: object) -> None:
    """One-line errors for the arguments of a picture call that the units would otherwise fail on deep inside
    (or, for a NaN guidance scale, not fail on at all: the picture would be garbage)."""
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(text, str):
            raise DiffusmithError(f"{name} must be a string, got {type(text).__name__}; for several pictures call "
                                  "the pipeline once per prompt")
    if not is_finite_number(cfg_scale) or cfg_scale < 0:
        raise DiffusmithError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise DiffusmithError(f"seed must be an integer or None (a random seed), got {seed!r}")


def _gather(unit: PipelineUnit, names: Iterable[str], source: dict, side: str) -> dict:
    missing = [n for n in names if n not in source]
    if missing:
        raise KeyError(f"{unit.name} reads {', '.join(missing)} from the {side} inputs, "
                       "but no caller or earlier unit provides it")
    return {n: source[n] for n in names}


def _checked_outputs(unit: PipelineUnit, out: dict) -> dict:
    undeclared = set(out) - set(unit.output_params)
    if undeclared:
        raise KeyError(f"{unit.name} returned undeclared output(s) {sorted(undeclared)}; "
                       "add them to its output_params")
    return out


def run_unit(pipe: BasePipeline, unit: PipelineUnit, shared: dict, posi: dict, nega: dict,
             cfg: bool) -> tuple[dict, dict, dict]:
    """Run one unit in its mode, updating and returning (shared, posi, nega)."""
    if unit.take_over:
        shared, posi, nega = unit.process(pipe, inputs_shared=shared, inputs_posi=posi, inputs_nega=nega)
        return shared, posi, nega
    if unit.separate_cfg:
        sides = [(posi, unit.input_params_posi, "positive")]
        if cfg:
            sides.append((nega, unit.input_params_nega, "negative"))
        for target, mapping, side in sides:
            kwargs = _gather(unit, unit.input_params, shared, "shared")
            side_inputs = _gather(unit, mapping.values(), {**shared, **target}, side)
            kwargs.update({arg: side_inputs[name] for arg, name in mapping.items()})
            target.update(_checked_outputs(unit, unit.process(pipe, **kwargs)))
        return shared, posi, nega
    kwargs = _gather(unit, unit.input_params, shared, "shared")
    shared.update(_checked_outputs(unit, unit.process(pipe, **kwargs)))
    return shared, posi, nega


class BasePipeline:
    """Holds models, the scheduler, device/dtype and the placement of models (offload)."""

    model_names: tuple[str, ...] = ()
    trainable_model: str | None = None  # the model LoRAs apply to and training trains

    def __init__(self, device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32,
                 offload: OffloadMode | str = "none", height_division_factor: int = 16,
                 width_division_factor: int = 16, block_swap: int | None = None):
        self.device = torch.device(device)
        self.torch_dtype = torch_dtype
        self.height_division_factor = height_division_factor
        self.width_division_factor = width_division_factor
        self.units: list[PipelineUnit] = []
        self.placer = ModelPlacer(self, OffloadMode.parse(offload), block_swap)

    # ---- models on the device ---------------------------------------------------------------------
    def models(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self, n) for n in self.model_names if getattr(self, n, None) is not None}

    def load_models_to_device(self, model_names: Iterable[str]) -> None:
        """Make sure the named models can run on ``self.device`` (what else stays there depends on offload)."""
        self.placer.onload(list(model_names))

    # ---- LoRA --------------------------------------------------------------------------------------
    @property
    def lora_target(self) -> str:
        """The model a LoRA applies to and training trains, as the pipeline class declares it."""
        if self.trainable_model is None:
            raise DiffusmithError(f"{type(self).__name__} declares no trainable model; pass model_name")
        return self.trainable_model

    def load_lora(self, path: str | Path, scale: float = 1.0, model_name: str | None = None,
                  allow_pickle: bool = False) -> None:
        """Merge a LoRA file (any common key style) into ``model_name`` (default: ``lora_target``) at
        ``scale``; undo with ``diffusmith.core.lora.remove_lora(model)``."""
        name = model_name or self.lora_target
        model = self._loaded_model(name, "load a LoRA into")
        lora = read_lora(path, model, allow_pickle=allow_pickle)
        apply_lora(model, lora, scale)
        logger.info("LoRA %s merged into %s (%d modules, scale %g)", path, name, len(lora), scale)

    # ---- speed -------------------------------------------------------------------------------------
    def compile(self, model_name: str | None = None, mode: str | None = None, **compile_kwargs: Any) -> None:
        """``torch.compile`` each repeated block of ``model_name`` (default: ``lora_target``, the denoiser):
        the first denoising steps are slow (each new shape compiles), the later ones faster. State dict keys,
        merged LoRAs and offload hooks are unaffected; ``compile_kwargs`` go to ``torch.compile``.
        ``mode="reduce-overhead"`` also replays each block as a CUDA graph; it needs ``offload="none"``."""
        if mode in CUDA_GRAPH_MODES and self.placer.mode is not OffloadMode.NONE:
            raise DiffusmithError(f"CUDA graphs (--compile-mode {mode}) need the models resident "
                                  f"on the GPU, not offload {self.placer.mode.value!r}: drop --offload / "
                                  "--block-swap, or use --compile-mode default")
        compile_repeated_blocks(self._loaded_model(model_name or self.lora_target, "compile"), mode=mode,
                                **compile_kwargs)

    def _loaded_model(self, name: str, action: str) -> torch.nn.Module:
        model = self.models().get(name)
        if model is None:
            raise DiffusmithError(f"cannot {action} {name!r}: the pipeline's loaded models are "
                                  f"{', '.join(self.models()) or 'none'}")
        return model

    # ---- images ------------------------------------------------------------------------------------
    def preprocess_image(self, image: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """PIL image (or a list of same-size images) -> (B, 3, H, W) float tensor in [-1, 1] (CPU, float32)."""
        images = [image] if isinstance(image, Image.Image) else list(image)
        array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 127.5 - 1.0
        return torch.from_numpy(array).permute(0, 3, 1, 2)  # (B, 3, H, W)

    @staticmethod
    def postprocess_image(image: torch.Tensor) -> list[Image.Image]:
        """(B, 3, H, W) in [-1, 1] -> PIL images, rounding as the reference does."""
        array = (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]

    def check_resize_height_width(self, height: int, width: int) -> tuple[int, int]:
        """Round a requested size to the nearest multiple the model takes, warning once if it changed."""
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise DiffusmithError(f"{name} must be an integer number of pixels, got {value!r}")
            if value < 16 or value > 16384:
                raise DiffusmithError(f"{name}={value} is out of range: use 16 to 16384 pixels")
        new_h = max(self.height_division_factor, round(height / self.height_division_factor)
                    * self.height_division_factor)
        new_w = max(self.width_division_factor, round(width / self.width_division_factor)
                    * self.width_division_factor)
        if (new_h, new_w) != (height, width):
            logger.warning("size %dx%d is not a multiple of %d; using %dx%d", width, height,
                           self.height_division_factor, new_w, new_h)
        return new_h, new_w

    def batches_cfg(self, batch_cfg: bool | None = None) -> bool:
        """Whether a true-CFG step runs both sides as one batch: ``batch_cfg``, or by default (None) where
        the models are streamed to the device block by block (``offload="sequential"``)."""
        if batch_cfg is None:
            return self.placer.mode is OffloadMode.SEQUENTIAL
        if not isinstance(batch_cfg, bool):
            raise DiffusmithError(f"batch_cfg must be True, False or None (automatic), got {batch_cfg!r}")
        return batch_cfg

    def run_units(self, shared: dict, posi: dict, nega: dict, cfg: bool) -> tuple[dict, dict, dict]:
        for unit in self.units:
            shared, posi, nega = run_unit(self, unit, shared, posi, nega, cfg)
        return shared, posi, nega
