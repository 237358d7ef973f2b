"""The GPU job (benchmarks/gpu_job.sh) checked on the CPU: a session that is lent a GPU has minutes on it, too few to
find a mistyped flag there, or a benchmark script that a change of the library broke."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import checkpointing  # benchmarks/ (on the path: conftest)
import gpu
import pytest
import run

JOB = Path(__file__).parents[1] / "benchmarks" / "gpu_job.sh"
PARSERS = {"gpu.py": gpu.parse_args, "run.py": run.parse_args, "checkpointing.py": checkpointing.parse_args}
# gpu.py on a model small enough for a CPU: 2 blocks of one head (width 128), 64x64 pixels, one step
TINY = ["--device", "cpu", "--layers", "2", "--heads", "1", "--size", "64", "--text-len", "16", "--steps", "1",
        "--warmup", "0"]


def job_commands() -> list[tuple[str, list[str]]]:
    """``(script, argv)`` of every benchmark script the job runs, in order, with its shell variables filled in:
    ``$OUT`` as ``OUT``, a ``for`` loop's variable as each of its values."""
    commands = []
    loop: tuple[str, list[str]] | None = None
    for line in JOB.read_text().replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#"):
            continue
        if m := re.match(r"\s*for (\w+) in (.*); do\s*$", line):
            loop = (m[1], shlex.split(m[2]))
            continue
        if line.strip() == "done":
            loop = None
            continue
        if not (m := re.search(r"python3 benchmarks/(\w+\.py)(.*?)(?:2>&1|\||$)", line)):
            continue
        args = m[2].replace("$OUT", "OUT")
        for value in loop[1] if loop else [None]:
            filled = args if value is None else args.replace(f"${loop[0]}", value)
            commands.append((m[1], shlex.split(filled)))
    return commands


def test_the_job_is_read_whole():
    commands = job_commands()
    assert {script for script, _ in commands} == set(PARSERS)
    assert len([c for c in commands if c[0] == "gpu.py"]) >= 15
    assert not any("$" in arg for _, argv in commands for arg in argv)  # every shell variable filled in
    # the loops' variables gave both of their values
    assert ["--infer", "--negative-len", "64", "--batch-cfg", "--json", "OUT/gpu_infer_neg64--batch-cfg.json",
            "--results", "OUT/RESULTS_gpu.md"] in [argv for _, argv in commands]


@pytest.mark.parametrize("script, argv", job_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_the_job_gives_each_script_flags_it_takes(script, argv):
    PARSERS[script](argv)  # argparse exits (SystemExit 2) on an unknown flag or a bad value


def _eager_gpu_runs() -> list[list[str]]:
    """The job's gpu.py runs without their output paths, each once; compiled runs left out (inductor takes tens of
    seconds per run on a CPU): the eager runs share their code."""
    runs = []
    for script, argv in job_commands():
        kept, skip = [], False
        for arg in argv:
            if skip:
                skip = False
            elif arg in ("--json", "--results"):
                skip = True
            else:
                kept.append(arg)
        if script == "gpu.py" and not any(a.startswith("--compile") for a in kept) and kept not in runs:
            runs.append(kept)
    return runs


@pytest.mark.parametrize("argv", _eager_gpu_runs(), ids=lambda v: " ".join(v) or "train")
def test_the_job_gpu_runs_complete_on_a_tiny_model(argv, tmp_path):
    out, results = tmp_path / "r.json", tmp_path / "RESULTS.md"
    assert gpu.main([*argv, *TINY, "--json", str(out), "--results", str(results)]) == 0
    r = json.loads(out.read_text())
    assert "error" not in r and "flops_error" not in r
    assert r["layers"] == 2 and r["heads"] == 1 and r["mode"] == ("infer" if "--infer" in argv else "train")
    assert math.isfinite(r["step_s"]) and r["step_s"] > 0
    # recomputation and a batch's padding only add work to what the model needs
    assert 0 < r["model_tflop"] <= r["hardware_tflop"]
    if "--block-swap" in argv and r["block_swap"] < r["layers"]:  # some blocks streamed: their copies counted
        assert r["swap_stats"]["prefetches"] + r["swap_stats"]["fetches"] > 0
    text = results.read_text()
    assert "### Reduced DiT" in text and "2 blocks of 1 heads" in text
    assert "<!-- gpu.py:" in text and "-2blocks-1heads" in text  # not the real size's section
