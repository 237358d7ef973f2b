"""Split training: run the frozen part of the pipeline once, store its outputs, train from them.

Which units are cached is derived, not listed per model: a unit is cacheable when it uses no trainable
model and its outputs do not change with the per-step randomness. That is measured on the first sample by
running the units twice under two RNG seeds: an output that changes is per-step (the noise), unless it is
the very object the unit received (the input-image unit passes the noise through as ``latents`` in
training mode: an *alias*, re-linked at train time). Units that are not cacheable (the noise initializer,
anything touching the trained model) run at train time as usual, so the RNG draws, and the loss, are the
same as without the cache.

Storage: safetensors shards (``shard-NNNNN.safetensors``, keys ``<sample>/<name>``) plus ``index.json``
holding the plan, per-sample scalars and a fingerprint of the model and dataset (never pickle).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import DiffusmithError
from ..pipelines.base import BasePipeline, PipelineUnit, run_unit

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
INDEX = "index.json"
SAMPLES_PER_SHARD = 256
LOSS_INPUTS = ("input_latents", "noise")  # what TrainingModule.loss_from_inputs reads besides model_fn's
SCALARS = (int, float, bool, str, type(None))


@dataclass
class CachePlan:
    """Which units the cache replaces and what it must hold."""

    cached_units: list[str]
    stored: dict[str, str] = field(default_factory=dict)  # output name -> "shared" | "posi"
    unit_outputs: dict[str, list[str]] = field(default_factory=dict)  # unit -> its stored outputs
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)  # unit -> {output: input passed through}

    def to_json(self) -> dict:
        return {"cached_units": self.cached_units, "stored": self.stored, "unit_outputs": self.unit_outputs,
                "aliases": self.aliases}

    @classmethod
    def from_json(cls, d: dict) -> CachePlan:
        return cls(list(d["cached_units"]), dict(d["stored"]), dict(d["unit_outputs"]), dict(d["aliases"]))


# ---- deriving the plan ---------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, Image.Image) and isinstance(b, Image.Image):
        return a.size == b.size and a.tobytes() == b.tobytes()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (torch.Tensor, Image.Image)) or isinstance(b, (torch.Tensor, Image.Image)):
        return False
    return a == b


def _trace(pipe: BasePipeline, shared: dict, posi: dict, seed: int) -> list[tuple[dict, dict, dict]]:
    """Run the units once; per unit: (values visible before it, its outputs, the side of each output)."""
    torch.manual_seed(seed)
    shared, posi, nega, trace = dict(shared), dict(posi), {}, []
    for unit in pipe.units:
        before = {**shared, **posi}
        shared, posi, nega = run_unit(pipe, unit, shared, posi, nega, cfg=False)
        after = {"shared": shared, "posi": posi}
        outputs = {n: after[s][n] for n in unit.output_params for s in ("shared", "posi") if n in after[s]}
        sides = {n: s for n in unit.output_params for s in ("shared", "posi") if n in after[s]}
        trace.append((before, outputs, sides))
    return trace


def derive_plan(pipe: BasePipeline, trainable: Sequence[str], shared: dict, posi: dict,
                needed_later: Sequence[str]) -> CachePlan:
    """Decide, from two probe runs on one sample, which units the cache replaces (see module doc)."""
    rng = torch.get_rng_state()
    try:
        run_a = _trace(pipe, shared, posi, seed=1234)
        run_b = _trace(pipe, shared, posi, seed=4321)
    finally:
        torch.set_rng_state(rng)
    plan = CachePlan(cached_units=[])
    cached_outputs: dict[str, tuple[str, str]] = {}  # output -> (unit, side)
    needs: set[str] = set(needed_later)
    for unit, (before, out_a, sides), (_, out_b, _) in zip(pipe.units, run_a, run_b, strict=True):
        aliases = {n: k for n, v in out_a.items() for k, w in before.items() if v is w and v is not None
                   and isinstance(v, torch.Tensor)}
        varying = {n for n in out_a if n not in aliases and not _same(out_a[n], out_b.get(n))}
        uses_trainable = any(m in trainable for m in unit.onload_model_names)
        if uses_trainable or varying:
            needs |= set(_unit_inputs(unit))
            continue
        plan.cached_units.append(unit.name)
        plan.aliases[unit.name] = {n: aliases[n] for n in out_a if n in aliases}
        for name in out_a:
            if name not in aliases:
                cached_outputs[name] = (unit.name, sides[name])
    for name in sorted(needs & set(cached_outputs)):
        unit_name, side = cached_outputs[name]
        plan.stored[name] = side
        plan.unit_outputs.setdefault(unit_name, []).append(name)
    if not plan.cached_units:
        raise DiffusmithError("nothing in this pipeline can be cached: every unit uses the trained model or "
                              "per-step randomness")
    return plan


def _unit_inputs(unit: PipelineUnit) -> list[str]:
    return [*unit.input_params, *unit.input_params_posi.values(), *unit.input_params_nega.values()]


def needed_by_training(pipe: BasePipeline) -> list[str]:
    """Inputs the loss and ``model_fn`` read (model_fn's parameters after the model)."""
    params = list(inspect.signature(pipe.model_fn).parameters.values())[1:]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [*names, *LOSS_INPUTS]


# ---- fingerprints ---------------------------------------------------------------------------------
def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, int(st.st_mtime)]


def model_fingerprint(model_root: Path, folders: Sequence[str]) -> str:
    """Configs and weight files (names, sizes, times) of the components the cache was made with."""
    parts = []
    for folder in sorted(folders):
        for f in sorted((model_root / folder).glob("*")):
            if f.is_file():
                parts.append([folder, *(_file_stamp(f) if f.suffix != ".json" else [f.name, f.read_text()])])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def dataset_fingerprint(dataset) -> list[str]:
    """One short hash per sample: image file (path, size, time), caption, target size, extra columns."""
    out = []
    for s in dataset.samples:
        stamp = [str(s.image), *_file_stamp(s.image)[1:], s.prompt, s.height, s.width,
                 json.dumps(s.extra, sort_keys=True, default=str)]
        out.append(hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16])
    return out


# ---- writing -------------------------------------------------------------------------------------------
def _check_storable(name: str, value: Any) -> None:
    if isinstance(value, (torch.Tensor, *SCALARS)):
        return
    raise DiffusmithError(f"cannot cache {name!r}: it is a {type(value).__name__}, not a tensor or a number; "
                          "train without --cache")


def _sample_inputs(pipe: BasePipeline, sample: dict) -> tuple[dict, dict]:
    shared = {**pipe.default_inputs(), **{k: v for k, v in sample.items() if k != "prompt"}}
    shared.update({"seed": None, "batch_size": 1})
    return shared, {"prompt": sample["prompt"]}


def _run_for_cache(pipe: BasePipeline, trainable: Sequence[str], shared: dict, posi: dict) -> dict:
    """Run the units on one sample, except those that need the trained model (not loaded for caching)."""
    shared, posi, nega = dict(shared), dict(posi), {}
    for unit in pipe.units:
        if not any(m in trainable for m in unit.onload_model_names):
            shared, posi, nega = run_unit(pipe, unit, shared, posi, nega, cfg=False)
    return {**shared, **posi}


def build_cache(pipe: BasePipeline, dataset, output: str | Path, trainable: Sequence[str],
                model_root: Path, cached_folders: Sequence[str], options: dict) -> Path:
    """Run the cacheable units over every sample (and the dropped caption) and write the cache folder."""
    out = Path(output)
    if (out / INDEX).exists() or (out.exists() and any(out.iterdir())):
        raise DiffusmithError(f"cache folder {out} is not empty; choose a new --output or delete it")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # every sample once, with its caption (dropout happens at train time, from the dropped-caption record)
    samples = [{**dataset[(0, i)], "prompt": dataset.samples[i].prompt} for i in range(len(dataset.samples))]
    pipe.scheduler.training = True
    try:
        with torch.no_grad():
            shared, posi = _sample_inputs(pipe, samples[0])
            plan = derive_plan(pipe, trainable, shared, posi, needed_by_training(pipe))
            logger.info("caching the outputs of %s: %s", ", ".join(plan.cached_units), ", ".join(plan.stored))
            records, shard, shard_index = [], {}, 0
            items = [*samples, {**samples[0], "prompt": ""}]  # the last one: the dropped caption
            for i, sample in enumerate(tqdm(items, desc="cache", unit="sample")):
                values = _run_for_cache(pipe, trainable, *_sample_inputs(pipe, sample))
                record = {"shard": shard_index, "scalars": {}, "none": []}
                for name in plan.stored:
                    value = values[name]
                    _check_storable(name, value)
                    if isinstance(value, torch.Tensor):
                        shard[f"{i}/{name}"] = value[0].detach().to("cpu").contiguous()
                    elif value is None:
                        record["none"].append(name)
                    else:
                        record["scalars"][name] = value
                records.append(record)
                if len(shard) and (i + 1) % SAMPLES_PER_SHARD == 0:
                    save_file(shard, tmp / f"shard-{shard_index:05d}.safetensors")
                    shard, shard_index = {}, shard_index + 1
            if shard:
                save_file(shard, tmp / f"shard-{shard_index:05d}.safetensors")
    finally:
        pipe.scheduler.training = False
    index = {"format_version": FORMAT_VERSION, "plan": plan.to_json(), "samples": records[:-1],
             "dropped_caption": records[-1], "options": options,
             "fingerprint": {"model": model_fingerprint(model_root, cached_folders),
                             "dataset": dataset_fingerprint(dataset)},
             "dtype": str(pipe.torch_dtype).removeprefix("torch.")}
    (tmp / INDEX).write_text(json.dumps(index))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


# ---- reading -------------------------------------------------------------------------------------------
class FeatureCache:
    """A cache folder opened for training: checks it still fits, then fills batches from it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_file = self.folder / INDEX
        if not index_file.exists():
            raise DiffusmithError(f"{self.folder} is not a diffusmith cache (no {INDEX}); make one with "
                                  "`diffusmith cache --output FOLDER ...` (an interrupted one has .partial)")
        self.index = json.loads(index_file.read_text())
        if self.index.get("format_version") != FORMAT_VERSION:
            raise DiffusmithError(f"cache {self.folder} was made by another diffusmith version; rebuild it")
        self.plan = CachePlan.from_json(self.index["plan"])
        self._shards: dict[int, Any] = {}

    def describe(self) -> str:
        """One line for ``diffusmith inspect``: samples, what is stored, the options and dtype it was made with."""
        options = ", ".join(f"{k}={v}" for k, v in self.index["options"].items())
        return (f"diffusmith feature cache of {len(self.index['samples'])} samples: the outputs of "
                f"{', '.join(self.plan.cached_units)} ({', '.join(sorted(self.plan.stored))}), made with "
                f"{options}, {self.index['dtype']}")

    def check(self, dataset, model_root: Path, cached_folders: Sequence[str], options: dict, dtype) -> None:
        """Refuse a cache made for another model, resolution or dataset, with what differs."""
        fp = self.index["fingerprint"]
        if fp["model"] != model_fingerprint(model_root, cached_folders):
            raise DiffusmithError(f"cache {self.folder} was made with another model (its VAE / text encoder "
                                  "files or configs differ); rebuild it with `diffusmith cache`")
        for key, value in options.items():
            if self.index["options"].get(key) != value:
                raise DiffusmithError(f"cache {self.folder} was made with {key}={self.index['options'].get(key)}"
                                      f", this run uses {key}={value}; rebuild the cache or use the same options")
        now, then = dataset_fingerprint(dataset), fp["dataset"]
        if now != then:
            changed = sum(a != b for a, b in zip(now, then, strict=False)) + abs(len(now) - len(then))
            raise DiffusmithError(f"cache {self.folder} is stale: {changed} of {len(now)} samples changed since "
                                  "it was made (images, captions or sizes); rebuild it with `diffusmith cache`")
        if self.index["dtype"] != str(dtype).removeprefix("torch."):
            raise DiffusmithError(f"cache {self.folder} holds {self.index['dtype']} features; this run computes "
                                  f"in {dtype}: use the same --mixed-precision as when caching")

    def _tensor(self, sample: int, name: str, shard: int) -> torch.Tensor:
        if shard not in self._shards:
            self._shards[shard] = safe_open(str(self.folder / f"shard-{shard:05d}.safetensors"), "pt")
        return self._shards[shard].get_tensor(f"{sample}/{name}")

    def _value(self, record: dict, sample: int, name: str) -> Any:
        if name in record["none"]:
            return None
        if name in record["scalars"]:
            return record["scalars"][name]
        return self._tensor(sample, name, record["shard"])

    def values(self, indices: Sequence[int], dropped: Sequence[bool], device: torch.device) -> dict[str, Any]:
        """The stored outputs for a batch: tensors stacked (sequences zero-padded, with masks), scalars shared."""
        out = {}
        for name, side in self.plan.stored.items():
            per_sample = []
            for i, drop in zip(indices, dropped, strict=True):
                use_dropped = drop and side == "posi"
                record = self.index["dropped_caption"] if use_dropped else self.index["samples"][i]
                per_sample.append(self._value(record, len(self.index["samples"]) if use_dropped else i, name))
            out[name] = per_sample
        return _collate(out, device)


def _collate(values: dict[str, list], device: torch.device) -> dict[str, Any]:
    """Stack per-sample values; a name ending in ``_mask`` is the padding mask of the same name without it."""
    out: dict[str, Any] = {}
    for name, items in values.items():
        if name.endswith("_mask") and name[:-5] in values:
            continue
        if all(isinstance(v, torch.Tensor) for v in items):
            length = max(v.shape[0] for v in items) if items[0].ndim else 0
            same = all(v.shape == items[0].shape for v in items)
            mask_name = f"{name}_mask"
            if same:
                out[name] = torch.stack(items).to(device)
            else:
                out[name] = torch.stack([torch.cat([v, v.new_zeros(length - v.shape[0], *v.shape[1:])])
                                         for v in items]).to(device)
            if mask_name in values:
                masks = [m if m is not None else torch.ones(v.shape[0], dtype=torch.long)
                         for m, v in zip(values[mask_name], items, strict=True)]
                mask = torch.stack([torch.cat([m, m.new_zeros(length - m.shape[0])]) for m in masks])
                out[mask_name] = None if bool(mask.all()) else mask.to(device)
        elif all(not isinstance(v, torch.Tensor) for v in items):
            if any(v != items[0] for v in items):
                raise DiffusmithError(f"cached {name!r} differs within a batch ({items}); this is a bug")
            out[name] = items[0]
        else:
            raise DiffusmithError(f"cached {name!r} mixes tensors and other values within a batch")
    return out


def apply_cached_unit(plan: CachePlan, unit: PipelineUnit, values: dict, shared: dict, posi: dict) -> None:
    """Stand in for a cached unit at train time: its stored outputs, and its pass-through outputs re-linked
    to this step's values (e.g. ``latents`` <- ``noise``)."""
    for name in plan.unit_outputs.get(unit.name, []):
        (posi if plan.stored[name] == "posi" else shared)[name] = values.get(name)
    visible = {**shared, **posi}
    for out, source in plan.aliases.get(unit.name, {}).items():
        shared[out] = visible[source]


class CachedDataset(torch.utils.data.Dataset):
    """A training dataset whose items point into the cache instead of loading images."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def bucket_of_each_sample(self):
        return self.dataset.bucket_of_each_sample

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (self.dataset.epoch, key)
        sample = self.dataset.samples[index % len(self.dataset.samples)]
        return {"cache_index": index % len(self.dataset.samples),
                "caption_dropped": self.dataset.caption_dropped(index, epoch),
                "height": sample.height, "width": sample.width}
