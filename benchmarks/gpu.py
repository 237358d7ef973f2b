"""Real-size Qwen-Image DiT on one GPU: seconds per step, peak GPU memory and model FLOPs utilisation.

Training (default): a LoRA step at 1024x1024 (4096 image tokens) with a 256-token prompt, LoRA rank 32 on the
model's default targets (fp32 LoRA weights, bf16 frozen weights, bf16 autocast), gradient checkpointing per
block, AdamW: diffusmith's ``TrainingModule.loss_from_inputs`` + backward + AdamW step + zero_grad.
``--infer``: one denoising step with true CFG (two DiT calls + CFG combine + Euler step), bf16;
``--batch-cfg``: the two predictions as one batch (``batch_cfg=True``; a shorter ``--negative-len`` is padded
and masked).

The random bf16 weights are made directly on the GPU (20.4B parameters, 41 GB: nothing is allocated on the
host). ``--block-swap N`` keeps all blocks but the last N in pinned host memory
(``diffusmith.core.memory.enable_block_swap``).

    python benchmarks/gpu.py [--infer] [--block-swap N] [--steps 5] [--warmup 2] [--layers K] [--json PATH]

MFU and HFU: the step's matrix-product FLOPs are counted by torch on the meta device before the timed run
(``benchmarks/flops.py``; a few seconds of CPU, no GPU memory). ``mfu`` divides the model FLOPs (the step as
the model needs it: no recomputation, attention as its plain products, each CFG prediction over its own
prompt's tokens) by time and the GPU's dense bf16 peak; ``mfu_hw`` (HFU) divides what the configured step runs
(checkpointing's recomputation, the fused attention kernel's, a batched CFG call's padding). A LoRA step
computes no weight gradients for the frozen weights: its model FLOPs are about 2.2 forwards, not the 3 of full
training (until 2026-12-02 this script credited 3 forwards, which overstated a LoRA step's MFU by about 1.4x).
LoRA products are counted. With ``--compile`` the count is the eager step's (inductor's partitioner may choose
other recomputation), and ``--fp8`` does not change it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import common
import flops

common.add_repo_to_path()

import torch  # noqa: E402

logger = logging.getLogger("benchmarks.gpu")
GiB = 2**30

# Dense bf16 peak (no sparsity) of SXM boards; a PCIe H100 is lower.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12))


def peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


def build_dit(cfg, device: torch.device):
    """Random bf16 DiT made directly on ``device`` (default init; weights never exist in fp32)."""
    from diffusmith.models.qwen_image.dit import QwenImageDiT

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = QwenImageDiT(cfg)
    finally:
        torch.set_default_dtype(default)
    return model


def latent_grid(args) -> tuple[int, int]:
    """(latent side, image tokens) of an ``--size`` picture: the VAE's 8x, then 2x2 patches."""
    latent = args.size // 8
    return latent, (latent // 2) ** 2


def make_step(args, dit, device: torch.device) -> tuple[Callable[[], None], torch.optim.Optimizer | None, dict]:
    """The timed step for ``dit`` on ``device``, its optimizer (training) and what to report of it.

    On the meta device (FLOP counting) the step is the same products without the optimizer, the fp32 LoRA copy
    and autocast, which change no product's shape."""
    from diffusmith.pipelines.qwen_image import QwenImagePipeline, QwenImageUnit_NoiseInitializer, join_cfg_sides

    meta = device.type == "meta"
    cfg = dit.config
    latent, image_tokens = latent_grid(args)
    valid = args.text_valid or args.text_len
    info: dict = {}
    pipe = QwenImagePipeline(device=device, torch_dtype=torch.bfloat16)
    pipe.dit = dit
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, args.text_len, cfg.joint_attention_dim, generator=g).to(device, torch.bfloat16)
    neg = torch.randn(1, args.negative_len or args.text_len, cfg.joint_attention_dim, generator=g).to(
        device, torch.bfloat16)
    mask = None  # batch 1 with no padding: diffusmith's prompt encoder gives no mask
    if valid < args.text_len:
        mask = torch.zeros(1, args.text_len, dtype=torch.long, device=device)
        mask[:, :valid] = 1

    if args.infer:
        dit.eval().requires_grad_(False)  # as a loaded pipeline component (block swap and fp8 take frozen weights)
        pipe.scheduler.set_timesteps(1000, image_seq_len=image_tokens, device=device)
        state = {"latents": torch.randn(1, 16, latent, latent, generator=g).to(device, torch.bfloat16), "i": 0}
        neg_mask = None if mask is None else mask[:, :neg.shape[1]]
        posi, nega = {"prompt_emb": emb, "prompt_emb_mask": mask}, {"prompt_emb": neg, "prompt_emb_mask": neg_mask}
        if args.batch_cfg:
            posi, nega = join_cfg_sides(posi, nega), None

        @torch.no_grad()
        def step() -> None:  # the body of QwenImagePipeline.__call__'s loop
            i, latents = state["i"], state["latents"]
            velocity = pipe.guided_velocity({}, posi, nega, latents, pipe.scheduler.timesteps[i], 4.0)
            state["latents"] = pipe.scheduler.step(velocity, i, latents)
            state["i"] = i + 1

        return step, None, info

    from diffusmith.schedulers.flow_match import TimestepSampling
    from diffusmith.training.module import LossSpec, TrainableSpec, TrainingModule
    from diffusmith.training.optim import make_optimizer

    module = TrainingModule(pipe, TrainableSpec(rank=args.rank),
                            LossSpec(sampling=TimestepSampling(), use_gradient_checkpointing=not args.no_gc,
                                     gradient_checkpointing_mode=args.gc_mode,
                                     gradient_checkpointing_interval=args.gc_interval))
    params = list(module.trainable_parameters().values())
    lora_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    if args.lora_dtype == "fp32" and not meta:
        for p in params:  # fp32 LoRA under bf16 autocast (TrainingModule leaves it in the model dtype)
            p.data = p.data.float()
    info["lora_params_m"] = sum(p.numel() for p in params) / 1e6
    info["lora_dtype"] = f"{'/'.join(lora_dtypes)} -> {args.lora_dtype}"
    optimizer = None if meta else make_optimizer(params, 1e-4)
    x0 = torch.randn(1, 16, latent, latent, generator=g).to(device, torch.bfloat16)
    noise_unit = QwenImageUnit_NoiseInitializer()

    def step() -> None:
        with contextlib.nullcontext() if meta else torch.autocast(device.type, dtype=torch.bfloat16):
            noise = noise_unit.process(pipe, height=args.size, width=args.size, seed=None, batch_size=1)
            loss = module.loss_from_inputs({"input_latents": x0, **noise},
                                           {"prompt_emb": emb, "prompt_emb_mask": mask})
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step, optimizer, info


def step_flops(args, cfg) -> dict[str, float]:
    """Model and hardware FLOPs of one step, counted on the meta device (see :mod:`flops`)."""
    meta = torch.device("meta")

    def counted(variant, fused_attention: bool) -> int:
        def count(layers: int) -> int:
            step, _, _ = make_step(variant, build_dit(dataclasses.replace(cfg, num_layers=layers), meta), meta)
            return flops.count_flops(step, fused_attention=fused_attention)

        return flops.extrapolate(count, cfg.num_layers)

    # as the model needs it: no recomputation, each CFG prediction over its own prompt's tokens
    needed = argparse.Namespace(**{**vars(args), "no_gc": True, "batch_cfg": False})
    return {"model": counted(needed, False), "hardware": counted(args, True)}


def run(args) -> dict:
    from diffusmith.core.attention import set_attention_backend
    from diffusmith.models.qwen_image.dit import PRESETS

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else common.cpu_model()
    real = PRESETS["real"]
    cfg = dataclasses.replace(real, num_layers=args.layers or real.num_layers,
                              num_attention_heads=args.heads or real.num_attention_heads)
    _, image_tokens = latent_grid(args)
    result: dict = {
        "mode": "infer" if args.infer else "train",
        "gc_mode": "none" if args.no_gc else args.gc_mode,
        "gc_interval": args.gc_interval,
        "device": name,
        "torch": torch.__version__,
        "layers": cfg.num_layers,
        "heads": cfg.num_attention_heads,
        "pixels": args.size,
        "image_tokens": image_tokens,
        "text_tokens": args.text_len,
        "text_valid": args.text_valid or args.text_len,
        "batch": 1,
        "block_swap": args.block_swap,
        "attention_backend": args.attention_backend,
    }
    if args.infer:
        result.update(negative_tokens=args.negative_len or args.text_len, batch_cfg=args.batch_cfg)

    started = time.perf_counter()
    result["forward_tflop"] = flops.dit_forward_flops(cfg, image_tokens, args.text_len) / 1e12
    try:
        counted = step_flops(args, cfg)
    except Exception as e:  # the timing is still worth having: MFU left empty
        logger.error("FLOP count failed, no MFU: %s", traceback.format_exc())
        result["flops_error"] = f"{type(e).__name__}: {e}"
        counted = None
    else:
        result["model_tflop"] = counted["model"] / 1e12
        result["hardware_tflop"] = counted["hardware"] / 1e12
    result["flops_count_s"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    dit = build_dit(cfg, device)
    common.synchronize(device)
    result["build_s"] = round(time.perf_counter() - started, 2)
    result["params_b"] = sum(p.numel() for p in dit.parameters()) / 1e9
    result["weights_gb"] = common.module_bytes(dit) / GiB
    logger.info("built %d-layer DiT on %s in %.1f s: %.2fB parameters, %.1f GiB", cfg.num_layers, name,
                result["build_s"], result["params_b"], result["weights_gb"])
    step, optimizer, info = make_step(args, dit, device)
    result.update(info)
    set_attention_backend(args.attention_backend)

    if args.fp8:  # generate --fp8 / train --fp8-base: the blocks' frozen Linears in float8 (before block swap)
        from diffusmith.core.memory import enable_fp8_storage

        enable_fp8_storage(dit)
        result["fp8"] = True
        result["weights_gb"] = common.module_bytes(dit) / GiB
    if args.compile or args.compile_mode:
        from diffusmith.core.memory import compile_repeated_blocks

        compile_repeated_blocks(dit, mode=args.compile_mode)
        result["compile"] = args.compile_mode or True
    swap = None
    if args.block_swap is not None:
        try:
            from diffusmith.core.memory import enable_block_swap
        except ImportError as e:
            msg = f"--block-swap needs diffusmith.core.memory.enable_block_swap, absent here ({e})"
            raise SystemExit(msg) from None
        started = time.perf_counter()
        swap = enable_block_swap(dit, device, blocks_on_device=args.block_swap)
        common.synchronize(device)
        if cuda:
            torch.cuda.empty_cache()
        result["swap_setup_s"] = round(time.perf_counter() - started, 2)
        on_device = min(args.block_swap, cfg.num_layers)
        block_gb = common.module_bytes(dit.transformer_blocks[-1]) / GiB
        result["block_weights_on_device_gb"] = on_device * block_gb
        logger.info("block swap: %d of %d blocks on the GPU (%.1f GiB of block weights), setup %.1f s", on_device,
                    cfg.num_layers, on_device * block_gb, result["swap_setup_s"])

    times = []
    common.synchronize(device)
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        seconds = common.time_call(step, device)
        logger.info("step %d/%d%s: %.3f s", i + 1, args.warmup + args.steps, " (warm-up)" if i < args.warmup else "",
                    seconds)
        if i >= args.warmup:
            times.append(seconds)
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")  # CPU: a smoke test, no memory
    if args.profile:  # where the time goes: the top kernels/ops of two more steps
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            step()
            step()
            common.synchronize(device)
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile), flush=True)
    step_s = common.median(times)
    result.update({
        "step_s": step_s,
        "steps_s": [round(t, 4) for t in times],
        "peak_gb": peak / GiB,
        "resident_before_gb": base / GiB,
        "optimizer_state_gb": (common.optimizer_state_bytes(optimizer) / GiB) if optimizer else 0.0,
    })
    peak_bf16 = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(name)
    result["peak_bf16_tflops"] = peak_bf16 / 1e12 if peak_bf16 else None
    result["tflops_per_s"] = counted["model"] / step_s / 1e12 if counted else None
    result["mfu"] = counted["model"] / step_s / peak_bf16 if counted and peak_bf16 else None
    result["mfu_hw"] = counted["hardware"] / step_s / peak_bf16 if counted and peak_bf16 else None
    if swap is not None:
        result["swap_stats"] = dict(swap.stats)
    if args.compile_mode:
        result["cudagraph_skips"] = common.cudagraph_skips()  # compiled graphs run without CUDA graphs
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from diffusmith.core.attention import ATTENTION_BACKENDS
    from diffusmith.core.memory import COMPILE_MODES, CUDA_GRAPH_MODES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--infer", action="store_true", help="time a CFG denoising step instead of training")
    parser.add_argument("--block-swap", type=int, default=None, metavar="N", help="keep N blocks on the GPU")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layers", type=int, default=None, help="a smaller slice of the model (default 60)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--heads", type=int, default=None,
                        help="attention heads of 128 channels (default 24, the real width 3072); fewer make a "
                             "narrower model: a quick check of the script on a CPU")
    parser.add_argument("--text-len", type=int, default=256)
    parser.add_argument("--text-valid", type=int, default=None, help="real text tokens (fewer: padding + mask)")
    parser.add_argument("--negative-len", type=int, default=None, help="--infer: negative prompt tokens "
                        "(default: --text-len)")
    parser.add_argument("--batch-cfg", action="store_true", help="--infer: both CFG predictions as one batch")
    parser.add_argument("--fp8", action="store_true", help="the blocks' frozen Linear weights in float8")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--lora-dtype", choices=["fp32", "as-is"], default="fp32")
    parser.add_argument("--no-gc", action="store_true", help="train without gradient checkpointing")
    parser.add_argument("--gc-mode", choices=["full", "selective"], default="full",
                        help="gradient checkpointing mode (--gradient-checkpointing-mode of the trainer)")
    parser.add_argument("--gc-interval", type=int, default=1,
                        help="checkpoint every N-th block (--gradient-checkpointing-interval of the trainer)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if unknown")
    parser.add_argument("--compile", action="store_true", help="torch.compile the repeated blocks (--compile)")
    parser.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                        help="torch.compile's mode (implies --compile); reduce-overhead: CUDA graphs")
    parser.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                        help="the --attention-backend flag of generate and train")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="after timing, profile two steps and print the top ROWS ops")
    parser.add_argument("--json", default=None)
    parser.add_argument("--results", default=None, help="a markdown file to write this run's section into")
    parser.add_argument("--device", default="cuda",
                        help="cpu: a smoke test of the script, with --layers and --heads (tests/test_gpu_job.py)")
    args = parser.parse_args(argv)
    if args.compile_mode in CUDA_GRAPH_MODES and (args.block_swap is not None or not (args.infer or args.no_gc)):
        parser.error("--compile-mode with CUDA graphs needs --no-gc (or --infer) and no --block-swap, as the trainer")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.device == "cuda" and not torch.cuda.is_available():
        logger.error("gpu.py needs a CUDA device")
        return 2
    try:
        result = run(args)
        code = 0
    except (Exception, SystemExit) as e:  # report in the JSON too, so a batch job keeps what it learnt
        logger.error("%s", traceback.format_exc())
        result = {"mode": "infer" if args.infer else "train", "block_swap": args.block_swap,
                  "error": f"{type(e).__name__}: {e}"}
        if torch.cuda.is_available():
            result["peak_gb_at_error"] = torch.cuda.max_memory_allocated() / GiB
        code = 1
    result["command"] = "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    logger.info("%s", json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.results:
        # a smaller model (--layers, --heads) gets its own section, never the real size's
        tag = (f"gpu.py:{result['mode']}" + (f"-{args.layers}blocks" if args.layers else "")
               + (f"-{args.heads}heads" if args.heads else "")
               + (f"-swap{args.block_swap}" if args.block_swap is not None else "")
               + ("-nogc" if args.no_gc and not args.infer else "")
               + ("-selective" if args.gc_mode == "selective" and not (args.infer or args.no_gc) else "")
               + (f"-every{args.gc_interval}" if args.gc_interval != 1 and not (args.infer or args.no_gc) else "")
               + ("-fp8" if args.fp8 else "")
               + ("-compile" if args.compile or args.compile_mode else "")
               + (f"-{args.compile_mode}" if args.compile_mode else "")
               + (f"-{args.attention_backend}" if args.attention_backend != "auto" else "")
               + (f"-neg{args.negative_len}" if args.infer and args.negative_len else "")
               + ("-batchcfg" if args.infer and args.batch_cfg else ""))
        common.replace_section(args.results, tag, markdown(result))
    return code


def markdown(r: dict) -> str:
    """One short section per gpu.py run, for RESULTS.md."""
    title = {"train": "LoRA training step", "infer": "inference step (true CFG)"}[r["mode"]]
    if r["mode"] == "infer" and "negative_tokens" in r:
        title += (f", negative prompt {r['negative_tokens']} tokens"
                  + (", both predictions as one batch" if r["batch_cfg"] else ""))
    swap = f", block swap: {r['block_swap']} blocks on the GPU" if r.get("block_swap") is not None else ""
    real = r.get("layers") == 60 and r.get("heads", 24) == 24
    head = f"### {'Real-size' if real else 'Reduced'} DiT, {title}{swap}"
    if "error" in r:
        return f"{head}\n\n`{r['command']}` failed: {r['error']}"
    mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    mfu_hw = "-" if r.get("mfu_hw") is None else f"{100 * r['mfu_hw']:.1f}%"
    tflops = "-" if r.get("tflops_per_s") is None else f"{r['tflops_per_s']:.0f}"
    counted = (f"{r['model_tflop']:.1f} / {r['hardware_tflop']:.1f}" if "model_tflop" in r
               else f"not counted ({r.get('flops_error')})")
    storage = "fp8 block weights" if r.get("fp8") else "bf16"
    kernel = "" if r.get("attention_backend", "auto") == "auto" else f", attention backend {r['attention_backend']}"
    lines = [
        head, "",
        f"{r['device']}, torch {r['torch']}; {r['layers']} blocks of {r.get('heads', 24)} heads ({r['params_b']:.2f}B "
        f"parameters, {storage}, "
        f"{r['weights_gb']:.1f} GiB), {r['pixels']}x{r['pixels']} ({r['image_tokens']} image tokens), text "
        f"{r['text_tokens']} tokens, batch 1" + (f", LoRA {r['lora_params_m']:.1f}M ({r['lora_dtype']}), "
                                                 f"gradient checkpointing {r.get('gc_mode', 'full')}"
                                                 + (f" every {r['gc_interval']} blocks" if r.get("gc_interval", 1) != 1
                                                    else "") + ", AdamW"
                                                 if r["mode"] == "train" else "")
        + f"{kernel}. `{r['command']}`", "",
        "| s/step (median) | steps | peak GPU GiB | model TFLOP/s | MFU | HFU | TFLOP per step: model / hardware |",
        "|---|---|---|---|---|---|---|",
        f"| {r['step_s']:.3f} | {', '.join(f'{t:.3f}' for t in r['steps_s'])} | {r['peak_gb']:.1f} | "
        f"{tflops} | {mfu} | {mfu_hw} | {counted} |",
        "",
        "FLOPs counted by torch on the meta device (`benchmarks/flops.py`): model = the step without recomputation, "
        "attention as its plain products; hardware (HFU) = what this step runs, recomputation and the fused "
        f"attention kernel's included. The reference architecture's forward is {r['forward_tflop']:.1f} TFLOP.",
    ]
    if "cudagraph_skips" in r:
        lines += ["", f"Compiled with mode {r['compile']}: {r['cudagraph_skips']} compiled graphs ran without CUDA "
                  "graphs (torch's skips; 0 = every block replayed as a graph)."]
    if r.get("swap_stats"):
        lines += ["", f"Block swap: {r['block_weights_on_device_gb']:.1f} GiB of block weights on the GPU, setup "
                  f"{r['swap_setup_s']:.0f} s, copies {r['swap_stats']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
