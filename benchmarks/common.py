"""Shared helpers of the benchmarks: timing, peak memory, exact byte counts, machine info, peer imports.

Used by ``benchmarks/run.py`` (side-by-side, mid-size model) and ``benchmarks/gpu.py`` (real-size model).
Not part of the diffusmith package: these scripts add the repository root to ``sys.path`` themselves, so they
run from a plain checkout (the GPU machine has no diffusmith installed).
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def add_repo_to_path() -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device) -> float:
    """Seconds one call of ``fn`` takes, with the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------


def free(device) -> None:
    """Give back what the last run left: Python garbage, torch's cached CUDA blocks, glibc's free heap."""
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    malloc_trim()


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def allocation_trace(events) -> tuple[int, int]:
    """``(net, peak)`` bytes of a list of ``(time, address, signed size)`` allocator events, summed in time
    order. A free of memory allocated before the window (which the profiler reports when an earlier profiled
    window saw the allocation) is not the window's and is left out."""
    live: dict[int, int] = {}
    net = peak = 0
    for _, ptr, size in sorted(events):
        if size > 0:
            live[ptr] = size
            net += size
        elif ptr in live:
            net -= live.pop(ptr)
        peak = max(peak, net)
    return net, peak


class PeakMemory:
    """Peak memory above the level at the start of the window, in bytes (``.delta``), exact on both devices.

    CUDA: the caching allocator's ``max_memory_allocated`` minus ``memory_allocated`` at the start.
    CPU: every allocation and free of torch's CPU allocator inside the window, as ``torch.profiler`` records
    them (``profile_memory=True``), summed in time order. ``.net`` is what was still alive at the end.
    """

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.delta = self.net = 0

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return self
        # the collector runs now, not inside the window, where it would free memory that is not the window's
        gc.collect()
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                               profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.delta = max(0, torch.cuda.max_memory_allocated() - self.start)
            self.net = torch.cuda.memory_allocated() - self.start
            return
        from torch._C._profiler import _EventType

        self._profile.__exit__(*exc)
        if self._gc_was_enabled:
            gc.enable()
        events, stack = [], list(self._profile.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                events.append((event.start_time_ns, event.extra_fields.ptr, event.extra_fields.alloc_size))
        self.net, self.delta = allocation_trace(events)


class SavedTensors:
    """Exact bytes of the tensors autograd saves for backward inside the window, parameters left out
    (a storage counted once). Checkpointed regions save through checkpointing's own hooks, which this
    does not see: use it on runs without gradient checkpointing."""

    def __init__(self, module):
        import torch

        self._torch = torch
        self._params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._seen: dict[int, int] = {}
        self.bytes = 0

    def _pack(self, t):
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        ptr = storage.data_ptr()
        if ptr not in self._params:
            self._seen[ptr] = storage.nbytes()
        return t

    def __enter__(self) -> SavedTensors:
        self._hooks = self._torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self.bytes = sum(self._seen.values())
        self._seen.clear()


def module_bytes(module) -> int:
    """Exact bytes of a module's parameters and buffers (shared storage counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def trainable_bytes(module) -> int:
    """Bytes the gradients of the trainable parameters take (a gradient has its parameter's dtype)."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def optimizer_state_bytes(optimizer) -> int:
    import torch

    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


# ---------------------------------------------------------------------------------------------------------
# Machine and versions
# ---------------------------------------------------------------------------------------------------------


def cudagraph_skips() -> int:
    """Compiled graphs torch ran without CUDA graphs so far in this process (each skip logs its reason)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_vendor() -> str:
    """``intel``, ``amd`` or ``cpu``: a short name that keeps CPU results of different machines apart (their bf16
    figures do not compare: see the machine note in RESULTS.md)."""
    model = cpu_model().lower()
    return next((vendor for vendor in ("intel", "amd") if vendor in model), "cpu")


def load_average() -> str:
    """1-minute load average and CPU count: other processes on a shared machine skew CPU timings."""
    try:
        return f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    except OSError:
        return "unknown"


def machine_info(device) -> dict:
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "diffsynth": _version("diffsynth"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})",
        "load": load_average(),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    return info


# ---------------------------------------------------------------------------------------------------------
# The incumbent (diffsynth) without its data-loading extras
# ---------------------------------------------------------------------------------------------------------


class _StubModule(types.ModuleType):
    """Empty module: any attribute is another stub. Stands in for modules the benchmark never calls."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        child = _StubModule(f"{self.__name__}.{name}")
        child.__path__ = []
        setattr(self, name, child)
        return child

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__} is a stub in the benchmark")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: Iterable[str]):
        self.roots = tuple(roots)

    def find_spec(self, name, path, target=None):
        if any(name == r or name.startswith(r + ".") for r in self.roots):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


def import_diffsynth() -> types.SimpleNamespace:
    """Import the parts of diffsynth the benchmark runs: Qwen-Image DiT classes, ``model_fn_qwen_image``,
    its pipeline, ``FlowMatchSFTLoss`` and its LoRA injection.

    ``import diffsynth`` pulls in its dataset code (torchvision, imageio) and model-hub client (modelscope),
    which the DiT and the loss never use; those two are replaced by empty stub modules when missing, so the
    benchmark needs neither. Raises ImportError when diffsynth itself is not installed.
    """
    roots = ["diffsynth.core.data"]
    if importlib.util.find_spec("modelscope") is None:
        roots.append("modelscope")
    if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StubFinder(roots))
    dit = importlib.import_module("diffsynth.models.qwen_image_dit")
    modules = importlib.import_module("diffsynth.models.general_modules")
    pipeline = importlib.import_module("diffsynth.pipelines.qwen_image")
    loss = importlib.import_module("diffsynth.diffusion.loss")
    training = importlib.import_module("diffsynth.diffusion.training_module")
    return types.SimpleNamespace(
        QwenImageDiT=dit.QwenImageDiT,
        QwenImageTransformerBlock=dit.QwenImageTransformerBlock,
        QwenEmbedRope=dit.QwenEmbedRope,
        ApproximateGELU=dit.ApproximateGELU,
        TimestepEmbeddings=modules.TimestepEmbeddings,
        RMSNorm=modules.RMSNorm,
        AdaLayerNorm=modules.AdaLayerNorm,
        QwenImagePipeline=pipeline.QwenImagePipeline,
        model_fn_qwen_image=pipeline.model_fn_qwen_image,
        FlowMatchSFTLoss=loss.FlowMatchSFTLoss,
        DiffusionTrainingModule=training.DiffusionTrainingModule,
    )


# ---------------------------------------------------------------------------------------------------------
# Markdown results file
# ---------------------------------------------------------------------------------------------------------

RESULTS_HEADER = """# diffusmith benchmarks

Side-by-side measurements against diffusers (the reference) and DiffSynth-Studio (the incumbent), written by
`benchmarks/run.py` (one section per device, replaced on each run) and `benchmarks/gpu.py`; see
benchmarks/RESULTS.md in the repository for how to run them.
"""


def replace_section(path: str | Path, tag: str, body: str) -> None:
    """Write ``body`` between ``<!-- TAG:start -->`` and ``<!-- TAG:end -->`` in ``path`` (appended if absent)."""
    path = Path(path)
    text = path.read_text() if path.exists() else RESULTS_HEADER
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
