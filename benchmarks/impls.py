"""The three implementations of the benchmark, each set up for one mode from the same weights and inputs:
diffusmith, diffusers (its Qwen-Image transformer with peft LoRA and the step of its Qwen-Image LoRA training
example) and DiffSynth-Studio (its Qwen-Image DiT and FlowMatchSFTLoss); and the check that their model calls
agree before anything is timed."""

from __future__ import annotations

import contextlib
import functools
import logging
import traceback

import common

common.add_repo_to_path()

import torch  # noqa: E402
from torch import nn  # noqa: E402
from workload import (  # noqa: E402
    BATCHED_CFG,
    CFG_SCALE,
    LORA_TARGETS,
    LR,
    MODES,
    SCHEDULER_CONFIG,
    Context,
    Runner,
    Size,
    compile_mode,
    compiles,
    negative_tokens,
)

logger = logging.getLogger("benchmarks.impls")


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

