"""Side-by-side benchmark: diffusmith vs diffusers (reference) vs DiffSynth-Studio (incumbent).

One mid-size random Qwen-Image DiT (same weights and inputs for all three), one process, implementations
alternated step by step. For each mode it reports seconds per step (median after warm-up) and peak memory:

- ``train-*``: one LoRA training step = loss (noise, timestep, forward) + backward + AdamW step + zero_grad,
  each framework through its own training code: diffusmith ``TrainingModule.loss_from_inputs`` (the loss the
  trainer takes after the pipeline units ran), diffusers the step of ``train_dreambooth_lora_qwen_image.py``
  (weighting ``none``), diffsynth ``FlowMatchSFTLoss`` over its ``model_fn_qwen_image``.
- ``infer-*``: one denoising step with true CFG (two DiT calls + CFG combine + Euler step), each through its
  pipeline's own model call and scheduler; ``infer-bf16-batchcfg``: diffusmith's one call on both sides.

    python benchmarks/run.py [--device cpu|cuda] [--runs 10] [--warmup 3] [--json PATH] [--modes ...]
                             [--impls ...] [--results benchmarks/RESULTS.md] [--size mid|small|overhead]
                             [--padded-text]

Text: by default each implementation gets what its own prompt step returns for one prompt of ``text_valid``
real tokens (diffusmith and diffusers: the real tokens, mask None; diffsynth: the real tokens and an all-ones
mask); ``--padded-text`` gives diffusmith and diffusers ``text_len`` tokens with the padding masked.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import math
import shlex
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import common

common.add_repo_to_path()

import torch  # noqa: E402
from torch import nn  # noqa: E402

logger = logging.getLogger("benchmarks.run")

IMPLS = ("diffusmith", "diffusers", "diffsynth")
MODES = {
    # name: (training, dtype, gradient checkpointing: None, "full" (whole blocks) or "selective")
    "train-bf16": (True, torch.bfloat16, None),
    "train-bf16-gc": (True, torch.bfloat16, "full"),
    "train-bf16-sgc": (True, torch.bfloat16, "selective"),
    "train-fp32": (True, torch.float32, None),
    "train-fp32-gc": (True, torch.float32, "full"),
    "train-fp32-sgc": (True, torch.float32, "selective"),
    "train-bf16-compile": (True, torch.bfloat16, None),
    "train-bf16-gc-compile": (True, torch.bfloat16, "full"),
    "train-bf16-sgc-compile": (True, torch.bfloat16, "selective"),
    "infer-bf16": (False, torch.bfloat16, None),
    "infer-fp32": (False, torch.float32, None),
    "infer-bf16-compile": (False, torch.bfloat16, None),
    "infer-bf16-batchcfg": (False, torch.bfloat16, None),
    "train-bf16-cudagraphs": (True, torch.bfloat16, None),
    "infer-bf16-cudagraphs": (False, torch.bfloat16, None),
}
# Selective checkpointing (keep matmul/attention outputs, recompute the elementwise ops) exists in diffusmith
# only: diffusers' enable_gradient_checkpointing and diffsynth's flag recompute whole blocks.
# `-compile`: diffusmith's --compile (torch.compile of each repeated block). Neither peer's trainer compiles;
# diffusers has the same regional compilation (`compile_repeated_blocks`), which runs for it in
# DIFFUSERS_COMPILES; otherwise a peer runs its eager step of the same mode in the rotation,
# so that the compiled step is timed alternating with what the peers' tools run.
# `-cudagraphs` (CUDA only): diffusmith's `--compile-mode reduce-overhead`, each compiled block replayed as a CUDA
# graph; against diffusers' regional compilation in its default mode and DiffSynth's eager step.
CUDA_GRAPHED = {"train-bf16-cudagraphs", "infer-bf16-cudagraphs"}
COMPILED = {mode for mode in MODES if mode.endswith("-compile")} | CUDA_GRAPHED
DIFFUSERS_COMPILES = {"train-bf16-compile", "infer-bf16-compile"} | CUDA_GRAPHED
# `-batchcfg`: diffusmith runs true CFG's two predictions as one batch (`batch_cfg=True`, the default of a
# streamed DiT); the peers have no such option and run their two DiT calls in the same rotation. In these modes
# every implementation's negative prompt is a quarter of the positive's real tokens (a short negative prompt,
# as in use), so the batch pays for padding the negative and masking the padding.
BATCHED_CFG = {"infer-bf16-batchcfg"}


def negative_tokens(size: Size, mode: str) -> int:
    """The negative prompt's real tokens in ``mode``."""
    return max(1, size.text_valid // 4) if mode in BATCHED_CFG else size.text_valid


def compiles(impl: str, mode: str) -> bool:
    """Whether ``impl`` compiles its model in ``mode``."""
    return mode in COMPILED and (impl == "diffusmith" or (impl == "diffusers" and mode in DIFFUSERS_COMPILES))


def compile_mode(impl: str, mode: str) -> str | None:
    """torch.compile's mode for ``impl`` in a compiled ``mode`` (None: torch's default)."""
    return "reduce-overhead" if impl == "diffusmith" and mode in CUDA_GRAPHED else None


def supports(impl: str, mode: str) -> bool:
    """Whether ``impl`` runs in ``mode``: selective checkpointing is diffusmith's only; in a compiled mode a
    peer without compilation runs its eager step."""
    if MODES[mode][2] == "selective":
        return impl == "diffusmith"
    return True
# The same LoRA targets in all three (peft suffix matching; the module names are the checkpoint's in all three):
# attention of both streams, both MLPs, both AdaLN modulations: diffusmith's default list.
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1",
)
CFG_SCALE = 4.0
LR = 1e-4
# Qwen-Image's scheduler_config.json
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                        max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                        time_shift_type="exponential")


@dataclass(frozen=True)
class Size:
    layers: int
    heads: int
    pixels: int
    text_len: int
    text_valid: int
    rank: int
    head_dim: int = 128
    axes: tuple[int, int, int] = (16, 56, 56)
    joint_dim: int = 3584
    batch: int = 1

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def latent(self) -> int:
        return self.pixels // 8

    @property
    def image_tokens(self) -> int:
        return (self.latent // 2) ** 2

    def describe(self, padded_text: bool = False) -> str:
        text = (f"text {self.text_len} tokens ({self.text_valid} real + {self.text_len - self.text_valid} padding, "
                "masked) for diffusmith and diffusers, the real ones only for diffsynth" if padded_text else
                f"text {self.text_valid} real tokens, no padding")
        return (f"{self.layers} layers, {self.heads} heads x {self.head_dim} = width {self.width}, rope axes "
                f"{self.axes}, joint_attention_dim {self.joint_dim}, in 64 / out 16; {self.pixels}x{self.pixels} "
                f"(latents {self.latent}x{self.latent}, {self.image_tokens} image tokens), batch {self.batch}, "
                f"{text}, LoRA rank {self.rank}")


MID = Size(layers=4, heads=6, pixels=512, text_len=128, text_valid=100, rank=16)
SMALL = Size(layers=2, heads=2, pixels=256, text_len=64, text_valid=50, rank=16)
# The mid-size depth with negligible arithmetic (width 128, 16 image tokens, 12 text tokens): a step's time is
# what the framework spends per op (Python, dispatch, autograd), the regime of the mid-size model on a GPU, where
# its kernels take far less time than their launch.
OVERHEAD = Size(layers=4, heads=1, pixels=64, text_len=16, text_valid=12, rank=16, joint_dim=64)
SIZES = {"mid": MID, "small": SMALL, "overhead": OVERHEAD}


@dataclass
class Inputs:
    """The same tensors for every implementation (fp32 masters; each mode casts them)."""

    x0: torch.Tensor  # (B, 16, h, w) clean latents
    emb: torch.Tensor  # (B, T, joint) prompt embeddings
    neg: torch.Tensor  # (B, T, joint) negative prompt embeddings
    mask: torch.Tensor  # (B, T) long, 1 = real token
    noise: torch.Tensor  # (B, 16, h, w) initial noise for inference


@dataclass
class Runner:
    """One implementation set up for one mode: ``step()`` runs one measured step."""

    step: Callable[[], None]
    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    notes: list[str] = field(default_factory=list)

    def resident_bytes(self) -> int:
        """Weights + optimizer state: what is alive before a step starts (gradients are set to None)."""
        return common.module_bytes(self.model) + (common.optimizer_state_bytes(self.optimizer)
                                                  if self.optimizer else 0)

    def grad_bytes(self) -> int:
        if self.optimizer is None:
            return 0
        return sum(p.numel() * p.element_size() for g in self.optimizer.param_groups for p in g["params"])

    def lora_summary(self) -> str:
        params = [p for g in self.optimizer.param_groups for p in g["params"]] if self.optimizer else []
        if not params:
            return "-"
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
        return f"{sum(p.numel() for p in params) / 1e6:.2f}M {'/'.join(dtypes)}"


@dataclass
class Context:
    size: Size
    device: torch.device
    state_dict: dict[str, torch.Tensor]
    inputs: Inputs
    # False: each implementation gets what its own prompt step returns for one prompt (see ``prompt_inputs``);
    # True: the old case, diffusmith and diffusers attend over padded text with a mask.
    padded_text: bool = False
    gc_interval: int = 1  # diffusmith's --gradient-checkpointing-interval in its checkpointed modes

    def autocast(self, dtype: torch.dtype):
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(device=self.device, dtype=dtype if t.is_floating_point() else t.dtype)

    def prompt_inputs(self, impl: str, emb: torch.Tensor, dtype: torch.dtype,
                      tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prompt embeddings, mask or None)`` as ``impl``'s own prompt step gives them for one prompt of
        ``tokens`` (default ``size.text_valid``) real tokens.

        - diffusmith: ``encode_prompt`` keeps the real tokens and returns mask None when all are real (always
          at batch 1; tested in tests/test_text_encoder.py).
        - diffusers: ``QwenImagePipeline.encode_prompt`` pads to the longest prompt of the batch (none at batch
          1) and sets ``prompt_embeds_mask = None`` when the mask is all ones.
        - diffsynth: its prompt unit keeps the real tokens and returns an all-ones mask, which its model call
          reads only for the text length.

        With ``padded_text`` diffusmith and diffusers get all ``size.text_len`` tokens and the padding mask.
        """
        valid = tokens or self.size.text_valid
        mask = self.cast(self.inputs.mask, dtype).clone()
        mask[:, valid:] = 0
        emb = self.cast(emb, dtype)
        if impl == "diffsynth":
            return emb[:, :valid], mask[:, :valid]
        if self.padded_text:
            return emb, mask
        return emb[:, :valid], None


# ---------------------------------------------------------------------------------------------------------
# Models from the same weights
# ---------------------------------------------------------------------------------------------------------


def diffusers_transformer(size: Size) -> nn.Module:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=size.layers, attention_head_dim=size.head_dim,
        num_attention_heads=size.heads, joint_attention_dim=size.joint_dim, axes_dims_rope=size.axes,
    )


def diffusmith_dit(size: Size) -> nn.Module:
    from diffusmith.models.qwen_image.dit import QwenImageDiT, QwenImageDiTConfig

    config = QwenImageDiTConfig(num_layers=size.layers, attention_head_dim=size.head_dim,
                                num_attention_heads=size.heads, joint_attention_dim=size.joint_dim,
                                axes_dims_rope=size.axes)
    return QwenImageDiT(config)


def diffsynth_dit(ds, size: Size) -> nn.Module:
    """diffsynth's ``QwenImageDiT``. Its constructor hard-codes the real width (3072, 24 heads, 3584 text, rope
    axes (16, 56, 56)), so a smaller width is assembled from its own classes exactly as that constructor does."""
    if (size.width, size.heads, size.joint_dim, tuple(size.axes)) == (3072, 24, 3584, (16, 56, 56)):
        return ds.QwenImageDiT(num_layers=size.layers)
    dim = size.width
    model = ds.QwenImageDiT.__new__(ds.QwenImageDiT)
    nn.Module.__init__(model)
    model.pos_embed = ds.QwenEmbedRope(theta=10000, axes_dim=list(size.axes), scale_rope=True)
    model.time_text_embed = ds.TimestepEmbeddings(256, dim, diffusers_compatible_format=True, scale=1000,
                                                  align_dtype_to_timestep=False, use_additional_t_cond=False)
    model.txt_norm = ds.RMSNorm(size.joint_dim, eps=1e-6)
    model.img_in = nn.Linear(64, dim)
    model.txt_in = nn.Linear(size.joint_dim, dim)
    model.transformer_blocks = nn.ModuleList(
        [ds.QwenImageTransformerBlock(dim=dim, num_attention_heads=size.heads, attention_head_dim=size.head_dim)
         for _ in range(size.layers)])
    model.norm_out = ds.AdaLayerNorm(dim, single=True)
    model.proj_out = nn.Linear(dim, 64)
    return model


def load_weights(model: nn.Module, state_dict: dict, ctx: Context, dtype: torch.dtype) -> nn.Module:
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{type(model).__name__}: weights do not fit: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    return model.to(device=ctx.device, dtype=dtype)


def upcast_lora(params) -> bool:
    """The train-bf16 mode keeps trainable (LoRA) weights in fp32 under bf16 autocast. Returns whether any
    parameter had to be cast."""
    cast = False
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
            cast = True
    return cast


# ---------------------------------------------------------------------------------------------------------
# diffusmith
# ---------------------------------------------------------------------------------------------------------


def build_diffusmith(ctx: Context, mode: str) -> Runner:
    from diffusmith.core.memory import compile_repeated_blocks
    from diffusmith.pipelines.qwen_image import QwenImagePipeline, QwenImageUnit_NoiseInitializer, join_cfg_sides
    from diffusmith.schedulers.flow_match import TimestepSampling
    from diffusmith.training.module import LossSpec, TrainableSpec, TrainingModule
    from diffusmith.training.optim import make_optimizer

    training, dtype, gc_mode = MODES[mode]
    use_gc = gc_mode is not None
    size, inp = ctx.size, ctx.inputs
    pipe = QwenImagePipeline(device=ctx.device, torch_dtype=dtype)
    pipe.dit = load_weights(diffusmith_dit(size), ctx.state_dict, ctx, dtype)
    emb, mask = ctx.prompt_inputs("diffusmith", inp.emb, dtype)

    if training:
        module = TrainingModule(pipe, TrainableSpec(rank=size.rank, targets=LORA_TARGETS),
                                LossSpec(sampling=TimestepSampling(), use_gradient_checkpointing=use_gc,
                                         gradient_checkpointing_mode=gc_mode or "full",
                                         gradient_checkpointing_interval=ctx.gc_interval))
        skipped = [n.rsplit(".", 1)[-1] for n in getattr(pipe.dit, "modules_without_gradient", list)()]
        notes = [f"LoRA skips the last block's {'/'.join(skipped)} (no gradient reaches them)"] if skipped else []
        if any(p.dtype != torch.float32 for p in module.trainable_parameters().values()):
            raise RuntimeError("diffusmith's LoRA weights are not float32: the trainer changed, update this benchmark")
        if compiles("diffusmith", mode):
            # what `diffusmith train --compile [--compile-mode reduce-overhead]` does, after the LoRA
            compile_repeated_blocks(pipe.dit, mode=compile_mode("diffusmith", mode))
        optimizer = make_optimizer(module.trainable_parameters().values(), LR)
        x0 = ctx.cast(inp.x0, dtype)
        noise_unit = QwenImageUnit_NoiseInitializer()  # what the trainer's units give each step: fresh noise

        def train_step() -> None:
            with ctx.autocast(dtype):
                shared = {"input_latents": x0, **noise_unit.process(pipe, height=size.pixels, width=size.pixels,
                                                                      seed=None, batch_size=size.batch)}
                loss = module.loss_from_inputs(shared, {"prompt_emb": emb, "prompt_emb_mask": mask})
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return Runner(train_step, pipe.dit, optimizer, notes)

    pipe.dit.eval()
    if compiles("diffusmith", mode):
        pipe.compile(mode=compile_mode("diffusmith", mode))  # what `diffusmith generate --compile` does
    neg, neg_mask = ctx.prompt_inputs("diffusmith", inp.neg, dtype, negative_tokens(size, mode))
    pipe.scheduler.set_timesteps(1000, image_seq_len=size.image_tokens, device=ctx.device)
    state = {"latents": ctx.cast(inp.noise, dtype), "i": 0}
    posi, nega = {"prompt_emb": emb, "prompt_emb_mask": mask}, {"prompt_emb": neg, "prompt_emb_mask": neg_mask}
    if mode in BATCHED_CFG:  # as __call__ does with batch_cfg=True: the sides joined once, before the loop
        posi, nega = join_cfg_sides(posi, nega), None

    @torch.no_grad()
    def infer_step() -> None:  # the body of QwenImagePipeline.__call__'s loop
        i, latents = state["i"], state["latents"]
        velocity = pipe.guided_velocity({}, posi, nega, latents, pipe.scheduler.timesteps[i], CFG_SCALE)
        state["latents"] = pipe.scheduler.step(velocity, i, latents)
        state["i"] = i + 1

    return Runner(infer_step, pipe.dit)


def forward_diffusmith(ctx: Context, model: nn.Module, x_t, timestep, emb, mask) -> torch.Tensor:
    from diffusmith.pipelines.qwen_image import model_fn_qwen_image

    return model_fn_qwen_image(model, latents=x_t, timestep=timestep, prompt_emb=emb, prompt_emb_mask=mask)


# ---------------------------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _diffusers_pipeline_class():
    try:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
    except ImportError:  # the same reshapes are done locally then
        logger.warning("diffusers' QwenImagePipeline does not import; packing latents with a local copy")
        return None
    return QwenImagePipeline


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """diffusers' ``QwenImagePipeline._pack_latents`` on (B, C, H, W)."""
    b, c, h, w = latents.shape
    pipeline = _diffusers_pipeline_class()
    if pipeline is not None:
        return pipeline._pack_latents(latents, b, c, h, w)
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(tokens: torch.Tensor, pixels: int) -> torch.Tensor:
    """diffusers' ``QwenImagePipeline._unpack_latents``: (B, L, 64) -> (B, 16, 1, H, W)."""
    pipeline = _diffusers_pipeline_class()
    if pipeline is not None:
        return pipeline._unpack_latents(tokens, pixels, pixels, 8)
    b, n, c = tokens.shape
    h = w = pixels // 8
    x = tokens.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c // 4, 1, h, w)


def build_diffusers(ctx: Context, mode: str) -> Runner:
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    training, dtype, gc_mode = MODES[mode]
    use_gc = gc_mode is not None
    size, inp = ctx.size, ctx.inputs
    transformer = load_weights(diffusers_transformer(size), ctx.state_dict, ctx, dtype)
    transformer.requires_grad_(False)
    emb, mask = ctx.prompt_inputs("diffusers", inp.emb, dtype)
    grid = size.latent // 2

    if training:
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
        from peft import LoraConfig

        # as train_dreambooth_lora_qwen_image.py: weights in weight_dtype, checkpointing, then the adapter
        if use_gc:
            transformer.enable_gradient_checkpointing()
        transformer.add_adapter(LoraConfig(r=size.rank, lora_alpha=size.rank, init_lora_weights="gaussian",
                                           target_modules=list(LORA_TARGETS)))
        transformer.train()
        if compiles("diffusers", mode):
            transformer.compile_repeated_blocks()  # diffusers' regional compilation, after the adapter
        params = [p for p in transformer.parameters() if p.requires_grad]
        notes = []
        if upcast_lora(params):  # the script's cast_training_params, which it applies for fp16 only
            notes.append("LoRA upcast to fp32 by the benchmark (the script keeps it bf16 under bf16)")
        optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
        scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
        model_input = ctx.cast(inp.x0, dtype)[:, :, None]  # (B, C, 1, H, W): the script's video-shaped latents
        img_shapes = [(1, grid, grid)] * size.batch

        def get_sigmas(timesteps: torch.Tensor, n_dim: int, dtype_: torch.dtype) -> torch.Tensor:
            sigmas = scheduler.sigmas.to(device=ctx.device, dtype=dtype_)
            schedule_timesteps = scheduler.timesteps.to(ctx.device)
            step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps.to(ctx.device)]
            sigma = sigmas[step_indices].flatten()
            while len(sigma.shape) < n_dim:
                sigma = sigma.unsqueeze(-1)
            return sigma

        def train_step() -> None:
            with ctx.autocast(dtype):
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=bsz, logit_mean=0.0,
                                                          logit_std=1.0, mode_scale=1.29)
                indices = (u * scheduler.config.num_train_timesteps).long()
                timesteps = scheduler.timesteps[indices].to(device=model_input.device)
                sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype_=model_input.dtype)
                noisy = (1.0 - sigmas) * model_input + sigmas * noise
                noisy = noisy.permute(0, 2, 1, 3, 4)
                packed = _pack(noisy[:, 0])
                pred = transformer(hidden_states=packed, encoder_hidden_states=emb, encoder_hidden_states_mask=mask,
                                   timestep=timesteps / 1000, img_shapes=img_shapes, return_dict=False)[0]
                pred = _unpack(pred, size.pixels)
                weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
                target = noise - model_input
                loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1), 1)
                loss = loss.mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        return Runner(train_step, transformer, optimizer, notes)

    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    transformer.eval()
    if compiles("diffusers", mode):
        transformer.compile_repeated_blocks()
    neg, neg_mask = ctx.prompt_inputs("diffusers", inp.neg, dtype, negative_tokens(size, mode))
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    n = 1000
    mu = calculate_shift(size.image_tokens, 256, 8192, 0.5, 0.9)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), device=ctx.device, mu=mu)
    img_shapes = [[(1, grid, grid)]] * size.batch
    state = {"latents": _pack(ctx.cast(inp.noise, dtype)), "i": 0}
    has_cache_context = hasattr(transformer, "cache_context")

    def cache_context(name: str):
        return transformer.cache_context(name) if has_cache_context else contextlib.nullcontext()

    @torch.no_grad()
    def infer_step() -> None:  # the body of QwenImagePipeline.__call__'s loop (true CFG)
        latents = state["latents"]
        t = scheduler.timesteps[state["i"]]
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        with cache_context("cond"):
            noise_pred = transformer(hidden_states=latents, timestep=timestep / 1000, guidance=None,
                                     encoder_hidden_states_mask=mask, encoder_hidden_states=emb,
                                     img_shapes=img_shapes, attention_kwargs=None, return_dict=False)[0]
        with cache_context("uncond"):
            neg_noise_pred = transformer(hidden_states=latents, timestep=timestep / 1000, guidance=None,
                                         encoder_hidden_states_mask=neg_mask, encoder_hidden_states=neg,
                                         img_shapes=img_shapes, attention_kwargs=None, return_dict=False)[0]
        comb_pred = neg_noise_pred + CFG_SCALE * (noise_pred - neg_noise_pred)
        cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
        noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
        noise_pred = comb_pred * (cond_norm / noise_norm)
        state["latents"] = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        state["i"] += 1

    return Runner(infer_step, transformer)


def forward_diffusers(ctx: Context, model: nn.Module, x_t, timestep, emb, mask) -> torch.Tensor:
    grid = ctx.size.latent // 2
    out = model(hidden_states=_pack(x_t), encoder_hidden_states=emb, encoder_hidden_states_mask=mask,
                timestep=timestep.expand(x_t.shape[0]).to(x_t.dtype) / 1000,
                img_shapes=[[(1, grid, grid)]] * x_t.shape[0], return_dict=False)[0]
    return _unpack(out, ctx.size.pixels)[:, :, 0]


# ---------------------------------------------------------------------------------------------------------
# diffsynth
# ---------------------------------------------------------------------------------------------------------


def build_diffsynth(ctx: Context, mode: str) -> Runner:
    ds = common.import_diffsynth()
    training, dtype, gc_mode = MODES[mode]
    use_gc = gc_mode is not None
    size, inp = ctx.size, ctx.inputs
    dit = load_weights(diffsynth_dit(ds, size), ctx.state_dict, ctx, dtype)
    pipe = ds.QwenImagePipeline(device=ctx.device, torch_dtype=dtype)
    pipe.dit = dit
    emb, mask = ctx.prompt_inputs("diffsynth", inp.emb, dtype)
    notes = ["sigmoid-GELU MLP; text: its real tokens, no attention mask (its prompt unit's output)"]

    if training:
        # as its train.py: scheduler in training mode, everything frozen, LoRA cast to the pipeline dtype
        pipe.scheduler.set_timesteps(1000, training=True)
        pipe.freeze_except([])
        pipe.dit = ds.DiffusionTrainingModule().add_lora_to_model(pipe.dit, target_modules=list(LORA_TARGETS),
                                                                  lora_rank=size.rank, upcast_dtype=dtype)
        pipe.dit.train()
        params = [p for p in pipe.dit.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=1e-2)
        x0 = ctx.cast(inp.x0, dtype)
        if dtype != torch.float32:
            notes.append("LoRA weights in bf16 and no autocast (its trainer casts trainable weights to the "
                         "pipeline dtype)")

        def train_step() -> None:
            inputs = {"input_latents": x0, "prompt_emb": emb, "prompt_emb_mask": mask, "height": size.pixels,
                      "width": size.pixels, "use_gradient_checkpointing": use_gc,
                      "use_gradient_checkpointing_offload": False}
            loss = ds.FlowMatchSFTLoss(pipe, **inputs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        return Runner(train_step, pipe.dit, optimizer, notes)

    pipe.dit.eval()
    neg, neg_mask = ctx.prompt_inputs("diffsynth", inp.neg, dtype, negative_tokens(size, mode))
    pipe.scheduler.set_timesteps(1000, denoising_strength=1.0, dynamic_shift_len=size.image_tokens)
    shared = {"latents": ctx.cast(inp.noise, dtype), "height": size.pixels, "width": size.pixels}
    posi = {"prompt_emb": emb, "prompt_emb_mask": mask}
    nega = {"prompt_emb": neg, "prompt_emb_mask": neg_mask}
    state = {"i": 0}

    @torch.no_grad()
    def infer_step() -> None:  # the body of its QwenImagePipeline.__call__'s loop
        i = state["i"]
        timestep = pipe.scheduler.timesteps[i].unsqueeze(0).to(dtype=pipe.torch_dtype, device=pipe.device)
        noise_pred = pipe.cfg_guided_model_fn(pipe.model_fn, CFG_SCALE, shared, posi, nega, dit=pipe.dit,
                                              blockwise_controlnet=None, timestep=timestep, progress_id=i)
        shared["latents"] = pipe.step(pipe.scheduler, progress_id=i, noise_pred=noise_pred, **shared)
        state["i"] = i + 1

    return Runner(infer_step, pipe.dit, notes=notes)


def forward_diffsynth(ctx: Context, model: nn.Module, x_t, timestep, emb, mask) -> torch.Tensor:
    ds = common.import_diffsynth()
    return ds.model_fn_qwen_image(dit=model, latents=x_t, timestep=timestep.reshape(1), prompt_emb=emb,
                                  prompt_emb_mask=mask, height=ctx.size.pixels, width=ctx.size.pixels)


BUILDERS = {"diffusmith": build_diffusmith, "diffusers": build_diffusers, "diffsynth": build_diffsynth}


# ---------------------------------------------------------------------------------------------------------
# Agreement check
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def check_agreement(ctx: Context, impls: list[str]) -> list[str]:
    """Velocity of the three model calls on the same weights and inputs, fp32. Returns report lines.

    Each implementation gets the text its own prompt step gives (``Context.prompt_inputs``); the padded and
    masked text (all ``text_len`` tokens) is also run through diffusmith and diffusers and compared with
    diffusers on the real tokens only, which checks that the masked padding changes nothing."""
    size, inp = ctx.size, ctx.inputs
    f32 = torch.float32
    x_t = ctx.cast(0.5 * inp.x0 + 0.5 * inp.noise, f32)
    timestep = torch.tensor(500.0, device=ctx.device)
    padded = ctx.cast(inp.emb, f32), ctx.cast(inp.mask, f32)
    real_only = padded[0][:, :size.text_valid], None
    builders = {"diffusmith": (lambda: diffusmith_dit(size), forward_diffusmith),
                "diffusers": (lambda: diffusers_transformer(size), forward_diffusers),
                "diffsynth": (lambda: diffsynth_dit(common.import_diffsynth(), size), forward_diffsynth)}
    outs: dict[str, torch.Tensor] = {}
    padded_outs: dict[str, torch.Tensor] = {}
    lines = []
    models = {}
    for name in impls:
        build, forward = builders[name]
        try:
            models[name] = load_weights(build(), ctx.state_dict, ctx, f32).eval()
            outs[name] = forward(ctx, models[name], x_t, timestep, *ctx.prompt_inputs(name, inp.emb, f32))
            if name != "diffsynth":
                padded_outs[name] = forward(ctx, models[name], x_t, timestep, *padded)
            if name == "diffusers":
                real_ref = forward(ctx, models[name], x_t, timestep, *real_only)
        except Exception as e:  # reported, and that implementation is then skipped
            lines.append(f"{name}: forward failed: {type(e).__name__}: {e}")
            logger.error("%s forward failed:\n%s", name, traceback.format_exc())
    ref = outs.get("diffusers")
    if ref is None:
        return lines
    scale = ref.abs().max().item()
    text = "the padded text" if ctx.padded_text else "its own prompt step's text"
    lines.append(f"each given {text}: output max |v| = {scale:.3g} (diffusers)")
    for name, out in outs.items():
        if name != "diffusers":
            lines.append(f"max |{name} - diffusers| = {(out - ref).abs().max().item():.2e}")
    for name, out in padded_outs.items():
        lines.append(f"max |{name} on {size.text_len} padded+masked tokens - diffusers on the {size.text_valid} "
                     f"real ones| = {(out - real_ref).abs().max().item():.2e}")
    if "diffsynth" in models:
        # Its MLP uses x * sigmoid(1.702 x) where the reference has tanh-GELU; with tanh-GELU swapped in, the
        # rest of the computation should agree to fp32 rounding.
        ds = common.import_diffsynth()
        original = ds.ApproximateGELU.forward
        ds.ApproximateGELU.forward = lambda self, x: torch.nn.functional.gelu(self.proj(x), approximate="tanh")
        try:
            out = forward_diffsynth(ctx, models["diffsynth"], x_t, timestep,
                                    *ctx.prompt_inputs("diffsynth", inp.emb, f32))
            lines.append(f"max |diffsynth (tanh-GELU swapped in) - diffusers| = {(out - ref).abs().max().item():.2e}")
        finally:
            ds.ApproximateGELU.forward = original
    del models
    return lines


# ---------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    common.malloc_trim()


def run_mode(ctx: Context, mode: str, impls: list[str], runs: int, warmup: int, mem_rounds: int) -> dict:
    runners: dict[str, Runner] = {}
    results: dict[str, dict] = {}
    baseline = torch.cuda.memory_allocated() if ctx.device.type == "cuda" else 0
    for name in impls:
        if not supports(name, mode):
            continue
        try:
            torch.manual_seed(0)
            runners[name] = BUILDERS[name](ctx, mode)
            if mode in COMPILED and not compiles(name, mode):
                runners[name].notes.append("its eager step in the -compile modes it has no compilation for")
            if mode in BATCHED_CFG and name != "diffusmith":
                runners[name].notes.append("its two DiT calls per CFG step in -batchcfg (it has no batched CFG)")
        except Exception as e:
            logger.error("%s %s: setup failed:\n%s", name, mode, traceback.format_exc())
            results[name] = {"error": f"setup: {type(e).__name__}: {e}"}
    times: dict[str, list[float]] = {name: [] for name in runners}
    last: dict[str, float] = {}
    skips = common.cudagraph_skips()
    if mode in COMPILED:
        warmup = max(warmup, 3)  # the first steps compile the block's forward and backward
    for r in range(warmup + runs):
        order = list(runners)
        order = order[r % len(order):] + order[:r % len(order)] if order else order
        for name in order:
            if name not in runners:
                continue
            try:
                seconds = common.time_call(runners[name].step, ctx.device)
            except Exception as e:
                logger.error("%s %s: step failed:\n%s", name, mode, traceback.format_exc())
                results[name] = {"error": f"step: {type(e).__name__}: {e}"}
                del runners[name]
                continue
            last[name] = seconds
            if r >= warmup:
                times[name].append(seconds)
        logger.info("  %s round %d/%d%s: %s", mode, r + 1, warmup + runs, " (warm-up)" if r < warmup else "",
                    ", ".join(f"{n} {last[n]:.3f}s" for n in runners if n in last))
    skipped = common.cudagraph_skips() - skips
    if mode in CUDA_GRAPHED and "diffusmith" in runners and skipped:
        runners["diffusmith"].notes.append(f"{skipped} of its compiled graphs ran without CUDA graphs (torch's "
                                           "skips; see the log)")
    # CUDA graphs keep their working memory allocated between steps (torch's graph pool): a step's rise above
    # the level at its start misses it. What is allocated beyond every runner's weights and optimizer state
    # (the others keep nothing between steps) is that pool, counted to the graphed runner.
    pool = {}
    if mode in CUDA_GRAPHED and "diffusmith" in runners:
        free(ctx.device)
        held = torch.cuda.memory_allocated() - baseline - sum(r.resident_bytes() for r in runners.values())
        pool["diffusmith"] = max(0, held)
    for name, runner in runners.items():
        delta = 0
        for _ in range(mem_rounds):
            free(ctx.device)
            with common.PeakMemory(ctx.device) as peak:
                runner.step()
            delta = max(delta, peak.delta)
        saved = None
        training, _, gc_mode = MODES[mode]
        if training and gc_mode is None and mode not in COMPILED:  # exact, blind to load: kept for backward
            with common.SavedTensors(runner.model) as hook:
                runner.step()
            saved = hook.bytes / common.MB
        resident, grads = runner.resident_bytes(), runner.grad_bytes()
        results[name] = {
            "step_s": common.median(times[name]),
            "step_s_min": min(times[name], default=float("nan")),
            "peak_mb": (resident + pool.get(name, 0) + delta) / common.MB,
            "activation_mb": (pool.get(name, 0) + delta - grads) / common.MB,
            "resident_mb": resident / common.MB,
            "grad_mb": grads / common.MB,
            "saved_for_backward_mb": saved,
            "step_s_all": [round(t, 5) for t in times[name]],
            "lora": runner.lora_summary(),
            "notes": runner.notes,
        }
        if name in pool:
            results[name]["graph_pool_mb"] = pool[name] / common.MB
    runners.clear()
    if mode in CUDA_GRAPHED:  # the graphs and their pool go with the runners
        torch._dynamo.reset()
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    free(ctx.device)
    return results


def make_inputs(size: Size, seed: int = 1) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    b, h = size.batch, size.latent
    mask = torch.zeros(b, size.text_len, dtype=torch.long)
    mask[:, : size.text_valid] = 1
    return Inputs(
        x0=torch.randn(b, 16, h, h, generator=g),
        emb=torch.randn(b, size.text_len, size.joint_dim, generator=g),
        neg=torch.randn(b, size.text_len, size.joint_dim, generator=g),
        mask=mask,
        noise=torch.randn(b, 16, h, h, generator=g),
    )


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}" if digits else f"{value:.0f}"


def _ratio(ours, peers: list) -> str:
    peers = [p for p in peers if p is not None and math.isfinite(p) and p > 0]
    if ours is None or not peers or not math.isfinite(ours):
        return "-"
    return f"{ours / min(peers):.2f}"


def markdown(results: dict, size: Size, info: dict, agreement: list[str], args, modes: list[str],
             impls: list[str]) -> str:
    device = "GPU" if args.device == "cuda" else "CPU"
    machine = info.get("gpu", "") + ("; host " if "gpu" in info else "") + info["cpu"]
    lines = [
        f"## {device}{'' if args.size == 'mid' else f', {args.size} size'}: {machine}",
        "",
        f"{info['date']}; torch {info['torch']}, diffusers {info['diffusers']}, diffsynth {info['diffsynth']}, "
        f"transformers {info['transformers']}, peft {info['peft']}, Python {info['python']}; load average "
        f"{info['load']} at the start, {common.load_average()} at the end.",
        f"Command: `python benchmarks/run.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`",
        "",
        f"Model: random Qwen-Image DiT, {size.describe(args.padded_text)}. Same weights and inputs in all three; "
        f"median of {args.runs} steps after {args.warmup} warm-up, implementations alternated step by step in "
        "one process. LoRA targets (all three): " + ", ".join(LORA_TARGETS) + ".",
        "",
        "Forward agreement (fp32, same weights, before timing): " + "; ".join(agreement) + ".",
        "",
        "| mode | " + " | ".join(f"{n} s/step" for n in impls) + " | ours / best peer (time) | "
        + " | ".join(f"{n} peak MB" for n in impls) + " | ours / best peer (memory) |",
        "|" + "---|" * (2 * len(impls) + 3),
    ]
    peers = [n for n in impls if n != "diffusmith"]
    for mode in modes:
        row = results_by_mode(results, mode, impls)
        # against the peers of the same rotation (in a compiled mode: diffusers compiled, diffsynth eager)
        t_ratio = _ratio(row["diffusmith"]["step_s"], [row[n]["step_s"] for n in peers]) \
            if "diffusmith" in row else "-"
        m_ratio = _ratio(row["diffusmith"]["peak_mb"], [row[n]["peak_mb"] for n in peers]) \
            if "diffusmith" in row else "-"
        lines.append(f"| {mode} | " + " | ".join(_fmt(row[n]["step_s"]) for n in impls) + f" | {t_ratio} | "
                     + " | ".join(_fmt(row[n]["peak_mb"], 0) for n in impls) + f" | {m_ratio} |")
    lines += ["", "Fastest step (s; less sensitive than the median to other load on a shared machine):", "",
              "| mode | " + " | ".join(impls) + " | ours / best peer |", "|" + "---|" * (len(impls) + 2)]
    for mode in modes:
        fastest = {n: results.get(n, {}).get(mode, {}).get("step_s_min") for n in impls}
        peer_fastest = [fastest[n] for n in peers]
        ratio = _ratio(fastest.get("diffusmith"), peer_fastest) if "diffusmith" in fastest else "-"
        lines.append(f"| {mode} | " + " | ".join(_fmt(fastest[n]) for n in impls) + f" | {ratio} |")
    errors = [f"{n} {m}: {results[n][m]['error']}" for n in impls for m in modes
              if "error" in results.get(n, {}).get(m, {})]
    if errors:
        lines += ["", "Failures: " + "; ".join(errors)]

    pairs = [(without_checkpointing(b), b) for b in modes
             if MODES[b][2] is not None and without_checkpointing(b) in modes]
    if pairs:
        lines += ["", "Gradient checkpointing: activation memory = peak - (weights + gradients + optimizer state); "
                  "target for diffusmith: activations with checkpointing <= 0.5x of without, at <= 1.25x the time.",
                  "", "| impl | modes | activation MB (no gc -> gc) | gc / no gc (activation) | gc / no gc (time) |",
                  "|---|---|---|---|---|"]
        for a, b in pairs:
            for n in impls:
                ra, rb = results.get(n, {}).get(a, {}), results.get(n, {}).get(b, {})
                if "activation_mb" not in ra or "activation_mb" not in rb:
                    continue
                act = rb["activation_mb"] / ra["activation_mb"] if ra["activation_mb"] > 0 else float("nan")
                tim = rb["step_s"] / ra["step_s"]
                lines.append(f"| {n} | {a} -> {b} | {ra['activation_mb']:.0f} -> {rb['activation_mb']:.0f} | "
                             f"{act:.2f} | {tim:.2f} |")

    saved_rows = [(m, {n: results.get(n, {}).get(m, {}).get("saved_for_backward_mb") for n in impls})
                  for m in modes if MODES[m][2] is None and MODES[m][0]]
    if saved_rows:
        lines += ["", "Tensors saved for backward in one training step, MB (exact: autograd's saved tensors minus the "
                  "weights; unaffected by other load):", "",
                  "| mode | " + " | ".join(impls) + " | ours / best peer |", "|" + "---|" * (len(impls) + 2)]
        for m, row in saved_rows:
            ratio = _ratio(row.get("diffusmith"), [row[n] for n in impls if n != "diffusmith"]) \
                if "diffusmith" in row else "-"
            lines.append(f"| {m} | " + " | ".join(_fmt(row[n], 0) for n in impls) + f" | {ratio} |")

    trains = [m for m in modes if MODES[m][0]][:1]  # an inference mode has no trainable parameters
    lines += ["", "Trainable parameters (LoRA) per implementation: " + "; ".join(
        f"{n}: {results[n][m]['lora']}" for n in impls for m in trains if "lora" in results.get(n, {}).get(m, {}))
        + ". Per implementation: " + "; ".join(
        f"{n}: {', '.join(sorted({note for m in modes for note in results.get(n, {}).get(m, {}).get('notes', [])}))}"
        for n in impls if any(results.get(n, {}).get(m, {}).get("notes") for m in modes)) + "."]
    if args.device == "cpu":
        lines += ["", "CPU timings mean something only on an otherwise idle machine: compare the load averages above "
                  "with the CPU count."]
    mem_note = ("exact (CUDA allocator)" if args.device == "cuda" else
                "exact: every allocation and free of torch's CPU allocator in the step, from torch.profiler's "
                "memory events")
    lines += ["", "How to read: `s/step` is a training step (loss + backward + AdamW + zero_grad) or, for infer-*, one "
              "denoising step with true CFG (2 DiT calls + combine + Euler step); `-gc` recomputes whole blocks in "
              "backward, `-sgc` (diffusmith only) checkpoints selectively: it keeps attention and product outputs and "
              "recomputes the elementwise ops and widening products; `-compile` is diffusmith's "
              "`--compile` (torch.compile of each block) and, in train-bf16-compile and infer-bf16-compile, "
              "diffusers' `compile_repeated_blocks()` (the same regional compilation; its training script does not "
              "compile); a peer without compilation runs its eager step in the same rotation (the ratios are against "
              "the best peer of the row); `-batchcfg` is diffusmith's batched CFG (`batch_cfg=True`: one DiT call "
              "on both sides, the negative padded and masked) against the peers' two calls, all with a negative "
              "prompt of a quarter of the positive's tokens; `-cudagraphs` (CUDA only) is diffusmith's "
              "`--compile-mode reduce-overhead` (each compiled block replayed as a CUDA graph) against diffusers "
              "compiled in the default mode and DiffSynth's eager step. "
              "`peak MB` = this implementation's "
              "weights + optimizer state (counted exactly) + the peak memory above that level during one step "
              f"({mem_note}). Ratios < 1 favour diffusmith. Targets: train-bf16 time <= 0.8x and memory <= 0.9x of "
              "the best peer; inference <= 0.9x diffusers. Text: "
              + ("diffusmith and diffusers attend over the padded text with a mask (`--padded-text`); diffsynth gets "
                 "the real tokens only (its prompt unit's output)." if args.padded_text else
                 "each gets what its own prompt step returns for one prompt: the real tokens with mask None "
                 "(diffusmith's `encode_prompt`, diffusers' `QwenImagePipeline.encode_prompt`, which drops an "
                 "all-ones mask), the real tokens with an all-ones mask that only sets the text length (diffsynth)."
                 )]
    return "\n".join(lines)


def without_checkpointing(mode: str) -> str:
    """``train-bf16-sgc-compile`` -> ``train-bf16-compile``: the mode a checkpointing mode is compared with."""
    return mode.replace("-sgc", "").replace("-gc", "")


def results_by_mode(results: dict, mode: str, impls: list[str]) -> dict:
    out = {}
    for name in impls:
        r = results.get(name, {}).get(mode, {})
        out[name] = {"step_s": r.get("step_s"), "peak_mb": r.get("peak_mb")}
    return out


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mem-rounds", type=int, default=1, help="extra steps per implementation for memory")
    parser.add_argument("--json", default=None)
    parser.add_argument("--modes", nargs="+", default=None, choices=list(MODES),
                        help="default: all (the -cudagraphs ones on CUDA only)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--results", default=str(common.REPO_ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-results", action="store_true", help="do not write the markdown file")
    parser.add_argument("--size", choices=list(SIZES), default="mid",
                        help="mid: the issue's model (default); small: a smoke test (2 layers, 256 px); overhead: "
                             "4 layers of width 128 at 64 px, where the step time is per-op overhead (the regime of "
                             "the mid-size model on a GPU); a size other than mid gets its own RESULTS.md section")
    parser.add_argument("--small", action="store_const", dest="size", const="small", help="the same as --size small")
    parser.add_argument("--padded-text", action="store_true",
                        help="give diffusmith and diffusers the text padded to text_len with a mask (the old case) "
                             "instead of what their prompt step gives for one prompt (no padding, no mask)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.modes is None:
        args.modes = [m for m in MODES if args.device == "cuda" or m not in CUDA_GRAPHED]
    elif args.device != "cuda" and CUDA_GRAPHED & set(args.modes):
        parser.error(f"{', '.join(sorted(CUDA_GRAPHED & set(args.modes)))}: CUDA graphs need --device cuda")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("diffusmith").setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 modes stay fp32 in all three
        torch.backends.cudnn.allow_tf32 = False

    size = SIZES[args.size]
    info = common.machine_info(device)
    logger.info("machine: %s", info)
    logger.info("model: %s", size.describe(args.padded_text))

    torch.manual_seed(0)
    reference = diffusers_transformer(size)
    state_dict = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    del reference
    ctx = Context(size, device, state_dict, make_inputs(size), padded_text=args.padded_text)

    agreement = check_agreement(ctx, args.impls)
    for line in agreement:
        logger.info("agreement: %s", line)
    free(device)

    results: dict[str, dict] = {name: {} for name in args.impls}
    for done, mode in enumerate(args.modes, 1):
        logger.info("mode %s", mode)
        for name, r in run_mode(ctx, mode, args.impls, args.runs, args.warmup, args.mem_rounds).items():
            results[name][mode] = r
            if "error" not in r:
                logger.info("  %-10s %-14s %.4f s/step  peak %.0f MB  activations %.0f MB", name, mode, r["step_s"],
                            r["peak_mb"], r["activation_mb"])
        # written after every mode, so that a run cut short (a time limit) keeps what it measured
        report = markdown(results, size, info, agreement, args, args.modes[:done], args.impls)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2))
        if not args.no_results:
            # CPU sections are kept apart by vendor: the machines' bf16 figures do not compare
            machine = args.device if args.device == "cuda" else f"cpu-{common.cpu_vendor()}"
            tag = f"run.py:{machine}" + ("" if args.size == "mid" else f"-{args.size}")
            common.replace_section(args.results, tag, report)
    logger.info("\n%s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
