"""diffusmith's LoRA training step under each gradient-checkpointing mode, alternated step by step.

The same mid-size model, inputs and step as ``benchmarks/run.py`` (``TrainingModule.loss_from_inputs`` +
backward + AdamW), built once per mode in one process and run round-robin, so that other load on a shared
machine falls on every mode alike. Reports, per mode, the median wall time and the median CPU time of this
process (less sensitive to other processes on the CPU), and the exact activation memory (peak minus
weights, gradients and optimizer state), with the ratios to no checkpointing.

    python benchmarks/checkpointing.py [--device cpu|cuda] [--dtype bf16|fp32] [--runs 7] [--warmup 1]
                                       [--results benchmarks/RESULTS.md] [--no-results] [--small]
                                       [--layers N] [--compile] [--interval N]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import time

import common
import impls
import torch
import workload

logger = logging.getLogger("benchmarks.checkpointing")

TARGET = "target: activations <= 0.5x of no checkpointing at <= 1.25x its time"


def timed(step, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one step."""
    common.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    common.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(ctx: workload.Context, modes: list[str], runs: int, warmup: int) -> dict[str, dict]:
    runners = {}
    for mode in modes:
        torch.manual_seed(0)
        runners[mode] = impls.build_diffusmith(ctx, mode)
    walls: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(warmup + runs):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for mode in order:
            wall, cpu = timed(runners[mode].step, ctx.device)
            if r >= warmup:
                walls[mode].append(wall)
                cpus[mode].append(cpu)
        logger.info("round %d/%d%s: %s", r + 1, warmup + runs, " (warm-up)" if r < warmup else "",
                    ", ".join(f"{m} {walls[m][-1]:.3f}s" for m in modes if walls[m]))
    results = {}
    for mode, runner in runners.items():
        common.free(ctx.device)
        with common.PeakMemory(ctx.device) as peak:
            runner.step()
        results[mode] = {
            "step_s": common.median(walls[mode]),
            "step_s_min": min(walls[mode]),
            "cpu_s": common.median(cpus[mode]),
            "peak_mb": (runner.resident_bytes() + peak.delta) / common.MB,
            "activation_mb": (peak.delta - runner.grad_bytes()) / common.MB,
            "step_s_all": [round(t, 4) for t in walls[mode]],
        }
    return results


def markdown(results: dict[str, dict], base: str, ctx: workload.Context, args, info: dict, load_end: str) -> str:
    device = "GPU" if args.device == "cuda" else "CPU"
    lines = [
        f"### Gradient checkpointing modes, diffusmith LoRA step ({device}, {args.dtype}"
        f"{', --compile' if args.compile else ''}"
        f"{f', checkpointing every {args.interval} blocks' if args.interval != 1 else ''})",
        "",
        f"{info['date']}; torch {info['torch']}; {info.get('gpu', info['cpu'])}; load average {info['load']} at "
        f"the start, {load_end} at the end. Command: `python benchmarks/checkpointing.py "
        f"{' '.join(shlex.quote(a) for a in sys.argv[1:])}`",
        "",
        f"Model: {ctx.size.describe()}. The modes alternate step by step in one process; median of {args.runs} "
        f"steps after {args.warmup} warm-up. Activation MB = exact peak during one step minus weights, gradients "
        f"and optimizer state; {TARGET}.",
        "",
        "| mode | checkpointing | s/step (median) | fastest | CPU s/step (median) | activation MB | activation "
        "ratio | time ratio | CPU-time ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ref = results[base]
    for mode, r in results.items():
        gc = workload.MODES[mode][2] or "none"
        lines.append(
            f"| {mode} | {gc} | {r['step_s']:.3g} | {r['step_s_min']:.3g} | {r['cpu_s']:.3g} | "
            f"{r['activation_mb']:.0f} | {r['activation_mb'] / ref['activation_mb']:.2f} | "
            f"{r['step_s'] / ref['step_s']:.2f} | {r['cpu_s'] / ref['cpu_s']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--results", default=str(common.REPO_ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-results", action="store_true", help="do not write the markdown file")
    parser.add_argument("--small", action="store_true", help="a smoke-test size (2 layers, 256 px)")
    parser.add_argument("--layers", type=int, default=None, help="blocks of the model (default: run.py's 4)")
    parser.add_argument("--compile", action="store_true",
                        help="the same three modes with diffusmith's --compile (bf16 only)")
    parser.add_argument("--interval", type=int, default=1,
                        help="--gradient-checkpointing-interval of the checkpointed modes (default 1: every block)")
    args = parser.parse_args(argv)
    if args.compile and args.dtype != "bf16":
        parser.error("--compile is measured in bf16 only")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("diffusmith").setLevel(logging.WARNING)
    device = torch.device(args.device)
    size = workload.SMALL if args.small else workload.MID
    if args.layers:
        size = dataclasses.replace(size, layers=args.layers)
    info = common.machine_info(device)
    torch.manual_seed(0)
    state_dict = {k: v.detach().clone() for k, v in impls.diffusmith_dit(size).state_dict().items()}
    ctx = workload.Context(size, device, state_dict, workload.make_inputs(size), gc_interval=args.interval)
    suffix = "-compile" if args.compile else ""
    if args.compile:
        args.warmup = max(args.warmup, 3)  # the first steps compile the block's forward and backward
    base = f"train-{args.dtype}{suffix}"
    modes = [base, f"train-{args.dtype}-gc{suffix}", f"train-{args.dtype}-sgc{suffix}"]
    results = measure(ctx, modes, args.runs, args.warmup)
    report = markdown(results, base, ctx, args, info, common.load_average())
    if not args.no_results:
        machine = "cuda" if args.device == "cuda" else f"cpu-{common.cpu_vendor()}"
        every = "" if args.interval == 1 else f":every-{args.interval}"
        common.replace_section(args.results, f"checkpointing.py:{machine}:{args.dtype}{suffix}:{size.layers}{every}",
                               report)
    logger.info("\n%s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
