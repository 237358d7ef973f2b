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

The modes, sizes and inputs are in ``workload.py``, the three implementations' setups and the agreement
check in ``impls.py``; this file measures and reports.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shlex
import sys
import traceback
from pathlib import Path

import common

common.add_repo_to_path()

import torch  # noqa: E402
from impls import BUILDERS, check_agreement, diffusers_transformer  # noqa: E402
from workload import (  # noqa: E402
    BATCHED_CFG,
    COMPILED,
    CUDA_GRAPHED,
    IMPLS,
    LORA_TARGETS,
    MODES,
    SIZES,
    Context,
    Runner,
    Size,
    compiles,
    make_inputs,
    supports,
)

logger = logging.getLogger("benchmarks.run")


# ---------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------


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
        common.free(ctx.device)
        held = torch.cuda.memory_allocated() - baseline - sum(r.resident_bytes() for r in runners.values())
        pool["diffusmith"] = max(0, held)
    for name, runner in runners.items():
        delta = 0
        for _ in range(mem_rounds):
            common.free(ctx.device)
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
    common.free(ctx.device)
    return results



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
    common.free(device)

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
