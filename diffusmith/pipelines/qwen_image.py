"""Qwen-Image: the units, ``model_fn`` and the pipeline (text-to-image and image-to-image).

The units below are all the preprocessing there is: training runs the same list with
``pipe.scheduler.training = True`` (and CFG off) and takes its loss on ``model_fn``'s output.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core.components import component_config, component_folder, load_component
from ..core.devices import resolve_device, resolve_dtype
from ..core.hub import resolve_model_path
from ..core.memory import begin_step, enable_fp8_storage
from ..core.signatures import identify_file
from ..errors import DiffusmithError
from ..models.qwen_image import signatures as _signatures  # noqa: F401  (registers the signatures)
from ..models.qwen_image.dit import QwenImageDiT, QwenImageDiTConfig, patchify, unpatchify
from ..models.qwen_image.text_encoder import (
    LEGACY_TO_CURRENT,
    build_text_encoder,
    detect_text_encoder_layout,
    encode_prompt,
    load_tokenizer,
)
from ..models.qwen_image.vae import QwenImageVAE, QwenImageVAEConfig
from ..schedulers.flow_match import FlowMatchScheduler
from .base import BasePipeline, PipelineUnit, check_generation_inputs
from .images import load_image, resize_and_crop

logger = logging.getLogger(__name__)


# ---- units -----------------------------------------------------------------------------------------
class QwenImageUnit_ShapeChecker(PipelineUnit):
    """Valid output size (multiples of 16) and an input image resized/cropped to exactly that size."""

    def __init__(self):
        super().__init__(input_params=("height", "width", "input_image"),
                         output_params=("height", "width", "input_image"))

    def process(self, pipe: QwenImagePipeline, height, width, input_image):
        if input_image is None:
            return {"height": height, "width": width, "input_image": None}
        images = [input_image] if not isinstance(input_image, (list, tuple)) else list(input_image)
        images = [load_image(im) for im in images]
        height, width = pipe.check_resize_height_width(height or images[0].height, width or images[0].width)
        images = [im if im.size == (width, height) else resize_and_crop(im, height, width) for im in images]
        single = not isinstance(input_image, (list, tuple))
        return {"height": height, "width": width, "input_image": images[0] if single else images}


class QwenImageUnit_NoiseInitializer(PipelineUnit):
    """Initial noise from ``seed`` with the reference's recipe (CPU generator, float32)."""

    def __init__(self):
        super().__init__(input_params=("height", "width", "seed", "batch_size"), output_params=("noise",))

    def process(self, pipe: QwenImagePipeline, height, width, seed, batch_size):
        generator = None if seed is None else torch.Generator("cpu").manual_seed(seed)
        shape = (batch_size, pipe.latent_channels, height // 8, width // 8)  # (B, 16, h, w)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return {"noise": noise.to(device=pipe.device, dtype=pipe.torch_dtype)}


class QwenImageUnit_InputImageEmbedder(PipelineUnit):
    """Image-to-image start (inference) or clean latents + pure noise (training): the seed's unit."""

    def __init__(self):
        super().__init__(
            input_params=("input_image", "noise", "tiled", "tile_size", "tile_stride"),
            output_params=("latents", "input_latents"),
            onload_model_names=("vae",),
        )

    def process(self, pipe: QwenImagePipeline, input_image, noise, tiled, tile_size, tile_stride):
        if input_image is None:
            return {"latents": noise, "input_latents": None}
        pipe.load_models_to_device(["vae"])
        image = pipe.preprocess_image(input_image).to(device=pipe.device, dtype=pipe.torch_dtype)
        input_latents = pipe.vae.encode(image, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)
        if pipe.scheduler.training:
            return {"latents": noise, "input_latents": input_latents}
        latents = pipe.scheduler.add_noise(input_latents, noise, timestep=pipe.scheduler.timesteps[0])
        return {"latents": latents, "input_latents": input_latents}


class QwenImageUnit_PromptEmbedder(PipelineUnit):
    """Prompt -> Qwen2.5-VL hidden states (template prefix dropped) and padding mask, per CFG side."""

    def __init__(self):
        super().__init__(
            input_params=("max_sequence_length",),
            input_params_posi={"prompt": "prompt"},
            input_params_nega={"prompt": "negative_prompt"},
            output_params=("prompt_emb", "prompt_emb_mask"),
            onload_model_names=("text_encoder",),
        )

    def process(self, pipe: QwenImagePipeline, prompt, max_sequence_length):
        pipe.load_models_to_device(["text_encoder"])
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        emb, mask = encode_prompt(pipe.text_encoder, pipe.tokenizer, prompts,
                                  max_sequence_length=max_sequence_length, device=pipe.device,
                                  dtype=pipe.torch_dtype)
        return {"prompt_emb": emb, "prompt_emb_mask": mask}


# ---- the model call --------------------------------------------------------------------------------
def model_fn_qwen_image(dit: QwenImageDiT, latents: torch.Tensor, timestep: torch.Tensor,
                        prompt_emb: torch.Tensor, prompt_emb_mask: torch.Tensor | None = None,
                        use_gradient_checkpointing: bool = False,
                        use_gradient_checkpointing_offload: bool = False,
                        gradient_checkpointing_mode: str = "full", gradient_checkpointing_interval: int = 1,
                        **_: object) -> torch.Tensor:
    """Velocity for ``latents`` at ``timestep`` (sigma * 1000). The DiT's forward holds all the math.

    ``gradient_checkpointing_mode``: ``"full"`` or ``"selective"`` recomputation of checkpointed blocks;
    ``gradient_checkpointing_interval``: checkpoint every N-th block."""
    timestep = timestep.to(device=latents.device, dtype=latents.dtype).expand(latents.shape[0])
    return dit(latents, timestep, prompt_emb, prompt_emb_mask,
               use_gradient_checkpointing=use_gradient_checkpointing,
               use_gradient_checkpointing_offload=use_gradient_checkpointing_offload,
               gradient_checkpointing_mode=gradient_checkpointing_mode,
               gradient_checkpointing_interval=gradient_checkpointing_interval)


_TEXT_INPUTS = ("prompt_emb", "prompt_emb_mask")  # the per-side model inputs join_cfg_sides joins


def join_cfg_sides(posi: dict, nega: dict) -> dict:
    """The positive and negative text inputs as one batch, positive first: the shorter prompt is padded with
    zero embeddings to the longer one's length and its padding masked (an all-real batch keeps mask None).

    One DiT call on the joined batch gives both velocities: the same numbers as two calls, up to the last bits
    of the masked attention (tested)."""
    unknown = sorted(k for side in (posi, nega) for k, v in side.items()
                     if isinstance(v, torch.Tensor) and k not in _TEXT_INPUTS)
    if unknown:
        raise DiffusmithError(f"batched CFG cannot join the per-side input(s) {', '.join(unknown)}; "
                              "run with batch_cfg=False")
    embs = [posi["prompt_emb"], nega["prompt_emb"]]
    masks = [posi.get("prompt_emb_mask"), nega.get("prompt_emb_mask")]
    length = max(e.shape[1] for e in embs)
    if all(m is None for m in masks) and all(e.shape[1] == length for e in embs):
        return {"prompt_emb": torch.cat(embs), "prompt_emb_mask": None}
    padded, padded_masks = [], []
    for emb, mask in zip(embs, masks, strict=True):
        batch, tokens, width = emb.shape
        real = torch.ones(batch, tokens, dtype=torch.bool, device=emb.device) if mask is None else mask.bool()
        padded.append(torch.cat([emb, emb.new_zeros(batch, length - tokens, width)], dim=1))
        padded_masks.append(torch.cat([real, real.new_zeros(batch, length - tokens)], dim=1))
    return {"prompt_emb": torch.cat(padded), "prompt_emb_mask": torch.cat(padded_masks)}


def cfg_combine(pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """True CFG as the reference does it: ``neg + s * (pos - neg)``, then each packed 2x2 token (64 values)
    rescaled to the norm it has in ``pos``."""
    pos_t, neg_t = patchify(pos), patchify(neg)  # (B, L, 64)
    comb = neg_t + scale * (pos_t - neg_t)
    comb = comb * (pos_t.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
    return unpatchify(comb, pos.shape[-2], pos.shape[-1])  # (B, 16, h, w)


# ---- loading ---------------------------------------------------------------------------------------
def _to_current_text_layout(state_dict: dict) -> dict:
    if detect_text_encoder_layout(state_dict.keys()) == "legacy":
        return LEGACY_TO_CURRENT.convert(state_dict)
    return state_dict


# (pipeline attribute, folder of the official layout, builder from config.json, key converter or None)
COMPONENTS = (
    ("dit", "transformer", lambda cfg: QwenImageDiT(QwenImageDiTConfig.from_dict(cfg)), None),
    ("vae", "vae", lambda cfg: QwenImageVAE(QwenImageVAEConfig.from_dict(cfg)), None),
    ("text_encoder", "text_encoder", build_text_encoder, _to_current_text_layout),
)
EXPECTED_SIGNATURES = {"transformer": "qwen_image.dit", "vae": "qwen_image.vae",
                       "text_encoder": "qwen_image.text_encoder"}


def _loose_file_converter(path: Path, folder: str, convert):
    """A loose .safetensors replacing a component: check what it is, strip a foreign prefix, convert."""
    match = identify_file(path)
    if not match.name.startswith(EXPECTED_SIGNATURES[folder]):
        raise DiffusmithError(f"{path} looks like a {match.describe or match.name} checkpoint, "
                              f"not a Qwen-Image {folder}")

    def strip_and_convert(state_dict: dict) -> dict:
        if match.prefix:
            state_dict = {k.removeprefix(match.prefix): v for k, v in state_dict.items()}
        return convert(state_dict) if convert else state_dict

    return strip_and_convert


# ---- the pipeline ----------------------------------------------------------------------------------
class QwenImagePipeline(BasePipeline):
    model_names = ("text_encoder", "dit", "vae")
    trainable_model = "dit"
    component_folders = {attr: folder for attr, folder, _, _ in COMPONENTS}
    latent_channels = 16

    def __init__(self, device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32,
                 offload: str = "none", block_swap: int | None = None):
        super().__init__(device=device, torch_dtype=torch_dtype, offload=offload, block_swap=block_swap)
        self.scheduler = FlowMatchScheduler()
        self.text_encoder: torch.nn.Module | None = None
        self.tokenizer = None
        self.dit: QwenImageDiT | None = None
        self.vae: QwenImageVAE | None = None
        self.units = [
            QwenImageUnit_ShapeChecker(),
            QwenImageUnit_NoiseInitializer(),
            QwenImageUnit_InputImageEmbedder(),
            QwenImageUnit_PromptEmbedder(),
        ]
        self.model_fn = model_fn_qwen_image

    def default_inputs(self) -> dict:
        """Inputs every run has unless the caller sets them (inference and training alike)."""
        return {"input_image": None, "seed": None, "batch_size": 1, "max_sequence_length": 512,
                "tiled": False, "tile_size": 128, "tile_stride": 64}

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str | torch.device = "cpu",
                        torch_dtype: torch.dtype | str = torch.float32, offload: str = "none",
                        allow_pickle: bool = False, models: Sequence[str] | None = None,
                        block_swap: int | None = None, fp8: bool = False,
                        **overrides: str | Path) -> QwenImagePipeline:
        """Load a Qwen-Image folder in the official layout (or a hub repo id, downloaded on first use).

        ``offload``: ``"none"``, ``"model"`` or ``"sequential"`` (see :mod:`diffusmith.core.offload`);
        ``block_swap=N`` keeps the DiT's last N blocks on the device and streams the others (sequential
        offload, which it implies); ``fp8=True`` stores the DiT blocks' Linear weights in float8 (e4m3, one
        scale per output row; upcast as each layer runs): half the memory and the streamed bytes of bf16, at
        fp8's rounding of the weights; ``models`` loads only these (e.g. ``["dit"]`` to train from a feature
        cache); ``overrides`` replace a component by a loose file, e.g.
        ``transformer="my_finetune.safetensors"``."""
        pipe = cls(device=resolve_device(device), torch_dtype=resolve_dtype(torch_dtype), offload=offload,
                   block_swap=block_swap)
        root = resolve_model_path(model)
        unknown = set(overrides) - {folder for _, folder, _, _ in COMPONENTS}
        if unknown:
            raise DiffusmithError(f"unknown component override(s) {sorted(unknown)}: use "
                                  + ", ".join(folder for _, folder, _, _ in COMPONENTS))
        pipe.scheduler = FlowMatchScheduler.from_pretrained(component_folder(root, "scheduler"))
        wanted = set(cls.model_names if models is None else models)
        if wanted - set(cls.model_names):
            raise DiffusmithError(f"unknown model name(s) {sorted(wanted - set(cls.model_names))}: use "
                                  + ", ".join(cls.model_names))
        if "text_encoder" in wanted:
            pipe.tokenizer = load_tokenizer(component_folder(root, "tokenizer"))
        for attr, folder, build, convert in COMPONENTS:
            if attr not in wanted:
                continue
            config = component_config(root, folder)
            weights = overrides.get(folder) or component_folder(root, folder)
            if folder in overrides:
                convert = _loose_file_converter(Path(weights), folder, convert)
            module = load_component(f"{folder} ({weights})", config, weights, build, pipe.torch_dtype,
                                    convert=convert, allow_pickle=allow_pickle)
            setattr(pipe, attr, module)
        if fp8:
            if pipe.dit is None:
                raise DiffusmithError("fp8 storage applies to the DiT: load it (models=[..., 'dit'])")
            enable_fp8_storage(pipe.dit)
        pipe.placer.place_all()
        return pipe

    def guided_velocity(self, shared: dict, posi: dict, nega: dict | None, latents: torch.Tensor,
                        timestep: torch.Tensor, cfg_scale: float | None) -> torch.Tensor:
        """The velocity of one denoising step. ``cfg_scale`` None: the positive prediction alone; otherwise
        true CFG over ``posi`` and ``nega``, or, with ``nega`` None, over ``posi`` holding both sides as one
        batch (:func:`join_cfg_sides`)."""
        begin_step(self.dit)  # one step of CUDA graphs (a no-op unless compiled with them)
        if cfg_scale is None:
            return self.model_fn(self.dit, **{**shared, **posi, "latents": latents}, timestep=timestep)
        if nega is None:
            both = self.model_fn(self.dit, **{**shared, **posi, "latents": torch.cat([latents, latents])},
                                 timestep=timestep)
            return cfg_combine(*both.chunk(2), cfg_scale)
        velocity = self.model_fn(self.dit, **{**shared, **posi, "latents": latents}, timestep=timestep)
        velocity_neg = self.model_fn(self.dit, **{**shared, **nega, "latents": latents}, timestep=timestep)
        return cfg_combine(velocity, velocity_neg, cfg_scale)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        cfg_scale: float = 4.0,
        input_image: Image.Image | str | Path | None = None,
        denoising_strength: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        num_inference_steps: int = 30,
        max_sequence_length: int = 512,
        tiled: bool = False,
        tile_size: int = 128,
        tile_stride: int = 64,
        progress_bar: bool = True,
        batch_cfg: bool | None = None,
    ) -> Image.Image:
        """Draw one picture.

        ``batch_cfg``: with true CFG, run the positive and negative predictions as one batch of two (one DiT
        call per step instead of two: each streamed block crosses to the device once, and half the kernel
        launches) instead of one after the other (the reference's way). None (the default) batches where the
        DiT is streamed (``offload="sequential"``), where it halves the weight traffic of a step; True
        always, which pays where a step is bound by launches (small models or pictures), at twice the
        activation memory; False never."""
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= 1000:
            raise DiffusmithError(f"num_inference_steps must be an integer in 1..1000, got {num_inference_steps}")
        check_generation_inputs(prompt=prompt, negative_prompt=negative_prompt, cfg_scale=cfg_scale, seed=seed)
        cfg_scale, seed = float(cfg_scale), None if seed is None else int(seed)  # numpy numbers too
        cfg = cfg_scale != 1.0
        batched = self.batches_cfg(batch_cfg) and cfg
        # the schedule depends on the final size, so settle it before the units that read timesteps
        if input_image is not None:
            input_image = load_image(input_image)
            height, width = height or input_image.height, width or input_image.width
        height, width = self.check_resize_height_width(1328 if height is None else height,
                                                       1328 if width is None else width)
        self.scheduler.set_timesteps(num_inference_steps, image_seq_len=(height // 16) * (width // 16),
                                     denoising_strength=denoising_strength, device=self.device)
        shared = {**self.default_inputs(), "height": height, "width": width, "input_image": input_image,
                  "seed": seed, "max_sequence_length": max_sequence_length, "tiled": tiled,
                  "tile_size": tile_size, "tile_stride": tile_stride}
        posi, nega = {"prompt": prompt}, {"negative_prompt": negative_prompt}
        shared, posi, nega = self.run_units(shared, posi, nega, cfg)

        self.load_models_to_device(["dit"])
        if batched:
            posi, nega = join_cfg_sides(posi, nega), None
        latents = shared["latents"]
        for i, timestep in enumerate(tqdm(self.scheduler.timesteps, disable=not progress_bar)):
            velocity = self.guided_velocity(shared, posi, nega, latents, timestep, cfg_scale if cfg else None)
            latents = self.scheduler.step(velocity, i, latents)

        self.load_models_to_device(["vae"])
        image = self.vae.decode(latents.to(self.torch_dtype), tiled=tiled, tile_size=tile_size,
                                tile_stride=tile_stride)
        return self.postprocess_image(image)[0]
