"""Training checkpoints: everything needed to continue a run exactly, in safetensors + JSON, never pickle.

Layout of one checkpoint (under the run's output folder)::

    OUT/checkpoints/step-000500/
        trainable.safetensors    the trainable weights by name, in their own dtype
        optimizer.safetensors    the optimizer's tensors (moments, steps, ...)
        state.json               step, epoch, data position, lr scheduler, the optimizer's non-tensor state,
                                 format_version, the caller's ``extra`` (e.g. the run's config)
        rng-<rank>.safetensors   one per process: torch CPU and CUDA generator states as uint8 tensors,
                                 Python's and numpy's states as JSON in the file's metadata
        optimizer-<rank>.safetensors
                                 instead of optimizer.safetensors when the optimizer state is sharded over
                                 the processes (FSDP, DeepSpeed ZeRO): each process's part, its non-tensor
                                 rest as JSON in the file's metadata; resuming needs the same process count
        COMPLETE                 written last: the format version and the size of every file above

A checkpoint is written into ``step-000500.tmp-<random>/``, every file is fsynced, ``COMPLETE`` goes in last,
and only then is the folder renamed to its final name. A crash at any point leaves either no
``step-000500/`` or a complete one; ``latest_checkpoint`` ignores ``.tmp-`` leftovers and folders without
``COMPLETE``.

Several processes (accelerate): each process owns its RNG state, so each writes its own file, and only the
main process writes the rest. Simplest, every process calls::

    save_checkpoint(out_dir, step, ..., is_main_process=accelerator.is_main_process,
                    rank=accelerator.process_index, barrier=accelerator.wait_for_everyone)

or, with the waiting in the caller's hands::

    write_rng(rng_staging_dir(out_dir, step), accelerator.process_index)    # every process
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(out_dir, step, ..., num_processes=accelerator.num_processes)
    accelerator.wait_for_everyone()                         # nobody reads the checkpoint before it exists

With one process ``save_checkpoint`` writes ``rng-0.safetensors`` itself; no staging is needed.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusmith.errors import DiffusmithError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINTS_FOLDER = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"

_FINAL_NAME = re.compile(r"^step-(\d+)$")
_TMP_NAME = re.compile(r"^step-(\d+)\.tmp-")
_RNG_FILE = re.compile(r"^rng-(\d+)\.safetensors$")
_OPTIMIZER_SHARD_FILE = re.compile(r"^optimizer-(\d+)\.safetensors$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _checkpoints_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINTS_FOLDER


def _rng_file_name(rank: int) -> str:
    return f"rng-{rank}.safetensors"


def _optimizer_shard_name(rank: int) -> str:
    return f"optimizer-{rank}.safetensors"


# ---------------------------------------------------------------------------------------------------------
# Nested state <-> JSON + a table of tensors.
# JSON has no tuples, no int dict keys, no NaN and no tensors; each gets a one-key marker object. A plain dict
# whose keys could be mistaken for a marker is written as an item list, so decoding is never ambiguous.
# ---------------------------------------------------------------------------------------------------------
_TENSOR, _TUPLE, _ITEMS, _FLOAT, _NDARRAY = "__tensor__", "__tuple__", "__items__", "__float__", "__ndarray__"
_MARKERS = {_TENSOR, _TUPLE, _ITEMS, _FLOAT, _NDARRAY}


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor] | None, what: str) -> Any:
    """``value`` as JSON-able data; tensors go into ``tensors`` (named by their path), or are refused when it
    is None. ``what`` names the section in error messages."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else {_FLOAT: repr(value)}  # 'nan', 'inf', '-inf'
    if isinstance(value, torch.Tensor):
        if tensors is None:
            raise DiffusmithError(f"{what} holds a tensor at '{path}', which this part of a checkpoint cannot "
                                  "store; pass plain numbers, strings, lists and dicts")
        name = path or "tensor"
        while name in tensors:
            name += "_"
        tensors[name] = value
        return {_TENSOR: name}
    if isinstance(value, np.ndarray):
        return {_NDARRAY: {"dtype": value.dtype.str, "shape": list(value.shape), "data": value.ravel().tolist()}}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, _join(path, i), tensors, what) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, _join(path, i), tensors, what) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _MARKERS):
            return {k: _encode(v, _join(path, k), tensors, what) for k, v in value.items()}
        return {_ITEMS: [[_encode(k, _join(path, "key"), None, what), _encode(v, _join(path, k), tensors, what)]
                         for k, v in value.items()]}
    raise DiffusmithError(f"{what} holds a {type(value).__module__}.{type(value).__qualname__} at "
                          f"'{path or '(top)'}', which cannot be stored without pickle; keep only numbers, "
                          "strings, lists, tuples, dicts and tensors in it")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor] | None) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((marker, inner),) = value.items()
        if marker == _TENSOR:
            if tensors is None or inner not in tensors:
                raise DiffusmithError(f"checkpoint refers to tensor '{inner}' that its safetensors file lacks; "
                                      "the checkpoint is damaged, use an earlier one")
            return tensors[inner]
        if marker == _TUPLE:
            return tuple(_decode(v, tensors) for v in inner)
        if marker == _ITEMS:
            return {_decode(k, None): _decode(v, tensors) for k, v in inner}
        if marker == _FLOAT:
            return float(inner)
        if marker == _NDARRAY:
            return np.asarray(inner["data"], dtype=np.dtype(inner["dtype"])).reshape(inner["shape"])
    return {k: _decode(v, tensors) for k, v in value.items()}


def optimizer_state_to_tensors(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into its tensors (named like ``state.0.exp_avg``) and a JSON-able rest.

    Works for any optimizer whose state holds tensors and plain Python values (torch's AdamW and SGD,
    bitsandbytes' 8-bit optimizers, ...); tuples such as AdamW's ``betas`` come back as tuples."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(dict(state_dict), "", tensors, "optimizer state")
    return tensors, encoded


def optimizer_state_from_tensors(tensors: Mapping[str, torch.Tensor], json_state: Mapping[str, Any]) -> dict:
    """Inverse of ``optimizer_state_to_tensors``: a dict for ``optimizer.load_state_dict``."""
    return _decode(dict(json_state), tensors)


def _to_json(value: Any, what: str) -> Any:
    return _encode(value, "", None, what)


# ---------------------------------------------------------------------------------------------------------
# Files: every write is followed by fsync, so "renamed into place" implies "on disk".
# ---------------------------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _for_safetensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU contiguous tensors; safetensors refuses two entries sharing memory, so later ones are
    copied."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise DiffusmithError(f"'{name}' is a {type(tensor).__name__}, not a tensor; pass tensors only")
        t = tensor.detach().cpu().contiguous()
        storage = (t.device.type, t.untyped_storage().data_ptr())
        if storage in seen and t.numel() > 0:
            t = t.clone()
        seen.add((t.device.type, t.untyped_storage().data_ptr()))
        out[name] = t
    return out


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file(_for_safetensors(tensors), path, metadata=metadata)
    _fsync_file(path)


def _write_json(data: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _remove_tree(path: Path) -> None:
    """Delete a checkpoint folder; its COMPLETE marker goes first, so a half-deleted folder never looks
    complete."""
    marker = path / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()
    shutil.rmtree(path, ignore_errors=True)


def _is_out_of_space(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    # safetensors reports write errors as SafetensorError with the OS message inside
    text = str(error)
    return f"os error {errno.ENOSPC})" in text or "No space left on device" in text


# ---------------------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------------------
def rng_staging_dir(out_dir: str | os.PathLike, step: int) -> Path:
    """Where every process puts its RNG file (``write_rng``) before the main process saves checkpoint
    ``step`` with ``num_processes > 1``."""
    return _checkpoints_root(out_dir) / f"{checkpoint_name(step)}.tmp-rng"


def write_rng(directory: str | os.PathLike, rank: int) -> Path:
    """Write this process's RNG states (Python, numpy, torch CPU, every CUDA device) to
    ``directory/rng-<rank>.safetensors``, atomically; returns the file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"torch.cpu": torch.get_rng_state()}
    cuda_devices = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{index}"] = state
            cuda_devices += 1
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "rank": str(rank),
        "cuda_devices": str(cuda_devices),
        "python_random": json.dumps(_to_json(random.getstate(), "Python RNG state")),
        "numpy_random": json.dumps(_to_json(np.random.get_state(), "numpy RNG state")),
    }
    return _save_tensors_atomically(tensors, directory / _rng_file_name(rank), metadata)


def _save_tensors_atomically(tensors: Mapping[str, torch.Tensor], final: Path, metadata: dict[str, str]) -> Path:
    partial = final.parent / f".{final.name}.partial-{secrets.token_hex(4)}"
    try:
        _save_tensors(tensors, partial, metadata)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return final


def write_optimizer_shard(directory: str | os.PathLike, rank: int, optimizer: Any) -> Path:
    """Write this process's part of a sharded optimizer state (``optimizer.state_dict()`` of FSDP or
    DeepSpeed ZeRO: it differs on every process) to ``directory/optimizer-<rank>.safetensors``, atomically;
    the non-tensor rest goes into the file's metadata as JSON."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, rest = optimizer_state_to_tensors(optimizer.state_dict())
    metadata = {"format_version": str(FORMAT_VERSION), "rank": str(rank),
                "state": json.dumps(rest, allow_nan=False)}
    return _save_tensors_atomically(tensors, directory / _optimizer_shard_name(rank), metadata)


def _read_with_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}


def _read_optimizer_shard(path: Path) -> dict:
    tensors, metadata = _read_with_metadata(path)
    return optimizer_state_from_tensors(tensors, json.loads(metadata["state"]))


def _restore_rng(path: Path) -> None:
    tensors, metadata = _read_with_metadata(path)
    random.setstate(_decode(json.loads(metadata["python_random"]), None))
    np.random.set_state(_decode(json.loads(metadata["numpy_random"]), None))
    torch.set_rng_state(tensors["torch.cpu"])
    saved_cuda = [tensors[f"torch.cuda.{i}"] for i in range(int(metadata.get("cuda_devices", "0")))]
    if saved_cuda:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < len(saved_cuda):
            logger.warning("checkpoint holds RNG states of %d CUDA devices but %d are visible; restoring %d",
                           len(saved_cuda), available, available)
        if available:
            torch.cuda.set_rng_state_all(saved_cuda[:available])


# ---------------------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Scan:
    complete: list[tuple[int, Path]] = field(default_factory=list)  # sorted by step
    incomplete: list[tuple[int, Path]] = field(default_factory=list)
    leftovers: list[tuple[int, Path]] = field(default_factory=list)  # .tmp- folders


def _scan(out_dir: str | os.PathLike) -> _Scan:
    scan = _Scan()
    root = _checkpoints_root(out_dir)
    if not root.is_dir():
        return scan
    for entry in root.iterdir():
        if not entry.is_dir():
            continue
        if match := _FINAL_NAME.match(entry.name):
            bucket = scan.complete if (entry / COMPLETE_MARKER).is_file() else scan.incomplete
            bucket.append((int(match.group(1)), entry))
        elif match := _TMP_NAME.match(entry.name):
            scan.leftovers.append((int(match.group(1)), entry))
    for items in (scan.complete, scan.incomplete, scan.leftovers):
        items.sort()
    return scan


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under ``out_dir/checkpoints``, or None."""
    scan = _scan(out_dir)
    skipped = [p.name for _, p in scan.incomplete + scan.leftovers]
    if skipped:
        logger.warning("skipped checkpoint folders left by interrupted saves (no %s marker): %s",
                       COMPLETE_MARKER, ", ".join(skipped))
    return scan.complete[-1][1] if scan.complete else None


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int | None) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints (None keeps all), and leftovers of
    interrupted saves older than the newest complete one. Returns the deleted folders."""
    if keep_last is None:
        return []
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise DiffusmithError(f"keep_last must be a whole number >= 1 or None, not {keep_last!r}")
    scan = _scan(out_dir)
    doomed = [p for _, p in scan.complete[:-keep_last]]
    if scan.complete:
        newest = scan.complete[-1][0]
        doomed += [p for s, p in scan.incomplete + scan.leftovers if s < newest]
    for path in doomed:
        _remove_tree(path)
        logger.info("deleted old checkpoint folder %s", path)
    return doomed


def _incomplete_error(path: Path) -> DiffusmithError:
    return DiffusmithError(f"checkpoint {path} is incomplete (interrupted save?); use an earlier one or "
                           "--resume latest")


def resolve_resume(out_dir: str | os.PathLike, resume: str | os.PathLike | None) -> Path | None:
    """The checkpoint to resume from: ``"latest"`` (None when there is none yet) or a checkpoint folder."""
    if resume is None or str(resume) == "":
        return None
    if str(resume) == "latest":
        found = latest_checkpoint(out_dir)
        if found is None:
            logger.info("no checkpoint under %s; starting fresh", _checkpoints_root(out_dir))
        else:
            logger.info("resuming from %s", found)
        return found
    path = Path(resume)
    if not path.is_dir():
        raise DiffusmithError(f"checkpoint {path} not found; give a step-NNNNNN folder or --resume latest")
    if not (path / COMPLETE_MARKER).is_file():
        if (path / CHECKPOINTS_FOLDER).is_dir() or path.name == CHECKPOINTS_FOLDER:
            raise DiffusmithError(f"{path} is not a checkpoint but holds checkpoints; give one of its "
                                  "step-NNNNNN folders or --resume latest")
        raise _incomplete_error(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------------
def _state_dict_or_none(obj: Any) -> Any:
    return None if obj is None else obj.state_dict()


def save_checkpoint(out_dir: str | os.PathLike, step: int, *, trainable: Mapping[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | None, lr_scheduler: Any | None,
                    data_state: Mapping[str, Any], epoch: int, extra: Mapping[str, Any] | None = None,
                    is_main_process: bool = True, rank: int = 0, barrier: Callable[[], Any] | None = None,
                    num_processes: int | None = None, optimizer_per_rank: bool = False) -> Path:
    """Write checkpoint ``step`` to ``out_dir/checkpoints/step-NNNNNN/`` atomically; returns its path.

    ``data_state`` is the data position (e.g. the batch sampler's ``state_dict()``) and ``extra`` anything
    else the caller wants back on resume (e.g. the run's config); both must be JSON-able. Out of disk space,
    the partial checkpoint is removed, earlier ones are kept, and a DiffusmithError says so.

    Several processes, two ways (only the main process writes weights and optimizer state; every process's
    RNG state is kept, in ``rng-<rank>.safetensors``):

    - pass ``barrier`` (e.g. ``accelerator.wait_for_everyone``) and call this on every process with its
      ``rank``, ``is_main_process`` and ``num_processes`` (taken from torch.distributed when it is
      initialized): the processes meet three times inside, also when one fails, so none is left waiting; the
      error is raised on the process where it happened;
    - or, without ``barrier``, see the module docstring: every process calls ``write_rng``, the caller waits
      for all, then the main process calls this with ``num_processes``; the others get the path back and
      write nothing. The caller waits for all again before anyone reads the checkpoint.

    ``optimizer_per_rank``: the optimizer's state is sharded over the processes (FSDP, DeepSpeed ZeRO), so
    every process writes its own ``optimizer-<rank>.safetensors`` (needs ``barrier`` with several
    processes)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise DiffusmithError(f"checkpoint step must be a whole number >= 0, not {step!r}")
    if num_processes is not None and num_processes < 1:
        raise DiffusmithError(f"num_processes must be >= 1, not {num_processes}")
    final = _checkpoints_root(out_dir) / checkpoint_name(step)
    staging = rng_staging_dir(out_dir, step)
    if barrier is not None and num_processes is None and dist.is_available() and dist.is_initialized():
        num_processes = dist.get_world_size()  # so the main process notices a process whose RNG file is missing

    collect_rng = barrier is not None or (num_processes or 1) > 1  # else this process's RNG is all there is
    if optimizer_per_rank and barrier is None and (num_processes or 1) > 1:
        raise DiffusmithError("a sharded optimizer state is written by every process: pass barrier")

    def write() -> None:
        _write_checkpoint(out_dir, step, final, trainable=trainable, optimizer=optimizer,
                          lr_scheduler=lr_scheduler, data_state=data_state, epoch=epoch, extra=extra,
                          rank=rank, rng_from=staging if collect_rng else None, num_processes=num_processes,
                          optimizer_per_rank=optimizer_per_rank)

    if barrier is None:
        if is_main_process:
            write()
        return final

    failure: BaseException | None = None

    def attempt(action: Callable[[], Any]) -> None:
        nonlocal failure
        if failure is None:
            try:
                action()
            except BaseException as error:  # re-raised after the last meeting, so no process waits forever
                failure = error

    if is_main_process:
        attempt(lambda: shutil.rmtree(staging, ignore_errors=True))  # rng files of an older attempt
    barrier()
    attempt(lambda: write_rng(staging, rank))
    if optimizer_per_rank:
        attempt(lambda: write_optimizer_shard(staging, rank, optimizer))
    barrier()
    if is_main_process:
        attempt(write)
    barrier()
    if failure is not None:
        if is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        if _is_out_of_space(failure) and not isinstance(failure, DiffusmithError):
            raise _no_space_error(out_dir, final) from failure
        raise failure
    return final


def _collect_staged(staging: Path, pattern: re.Pattern, name: Callable[[int], str], num_processes: int | None,
                    what: str, writer: str) -> list[Path]:
    ranks = sorted(int(m.group(1)) for p in staging.glob("*.safetensors") if (m := pattern.match(p.name)))
    expected = list(range(num_processes if num_processes is not None else max(ranks, default=-1) + 1))
    missing = sorted(set(expected) - set(ranks))
    if missing or not expected:
        raise DiffusmithError(f"{what} of process(es) {missing or [0]} missing in {staging}: every process must "
                              f"call {writer}(rng_staging_dir(out_dir, step), rank, ...) and wait for the others "
                              "before the main process saves")
    return [staging / name(r) for r in expected]


def _collect_rng_files(staging: Path, num_processes: int | None) -> list[Path]:
    return _collect_staged(staging, _RNG_FILE, _rng_file_name, num_processes, "RNG state", "write_rng")


def _write_checkpoint(out_dir: str | os.PathLike, step: int, final: Path, *, trainable: Mapping[str, torch.Tensor],
                      optimizer: Any, lr_scheduler: Any, data_state: Mapping[str, Any], epoch: int,
                      extra: Mapping[str, Any] | None, rank: int, rng_from: Path | None,
                      num_processes: int | None, optimizer_per_rank: bool = False) -> None:
    # Everything that can be refused is checked before the first byte is written.
    optimizer_tensors: dict[str, torch.Tensor] = {}
    optimizer_json = None
    if optimizer is not None and not optimizer_per_rank:
        optimizer_tensors, optimizer_json = optimizer_state_to_tensors(optimizer.state_dict())
    rng_files = _collect_rng_files(rng_from, num_processes) if rng_from is not None else []
    shard_files = []
    if optimizer_per_rank and rng_from is not None:
        shard_files = _collect_staged(rng_from, _OPTIMIZER_SHARD_FILE, _optimizer_shard_name, len(rng_files),
                                      "optimizer state", "write_optimizer_shard")
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "epoch": int(epoch),
        "num_processes": len(rng_files) or 1,
        "data_state": _to_json(dict(data_state), "data_state"),
        "lr_scheduler": _to_json(_state_dict_or_none(lr_scheduler), "lr scheduler state"),
        "optimizer": optimizer_json,
        "optimizer_shards": (len(rng_files) or 1) if optimizer_per_rank else None,
        "extra": _to_json(dict(extra or {}), "extra"),
    }

    root = final.parent
    tmp = root / f"{final.name}.tmp-{secrets.token_hex(4)}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for leftover_step, leftover in _scan(out_dir).leftovers:  # debris of saves that died
            if leftover != rng_from:
                logger.info("removing %s left by an interrupted save of step %d", leftover, leftover_step)
                _remove_tree(leftover)
        tmp.mkdir()
        _save_tensors(dict(trainable), tmp / TRAINABLE_FILE)
        if optimizer is not None and not optimizer_per_rank:
            _save_tensors(optimizer_tensors, tmp / OPTIMIZER_FILE)
        if rng_from is None:
            write_rng(tmp, rank)
            if optimizer_per_rank:
                write_optimizer_shard(tmp, rank, optimizer)
        for file in [*rng_files, *shard_files]:
            os.replace(file, tmp / file.name)
        _write_json(state, tmp / STATE_FILE)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_json({"format_version": FORMAT_VERSION, "step": step, "files": files}, tmp / COMPLETE_MARKER)
        _fsync_dir(tmp)
        _publish(tmp, final)
    except BaseException as error:
        _remove_tree(tmp)
        if _is_out_of_space(error):
            raise _no_space_error(out_dir, final) from error
        raise
    if rng_from is not None:
        shutil.rmtree(rng_from, ignore_errors=True)
    logger.info("saved checkpoint %s", final)


def _no_space_error(out_dir: str | os.PathLike, final: Path) -> DiffusmithError:
    last_good = latest_checkpoint(out_dir)
    return DiffusmithError(f"no space left on device while saving checkpoint {final}; free space; the last good "
                           f"checkpoint is {last_good or 'none (no checkpoint saved yet)'}")


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final``; an existing ``final`` (a half-written folder of an
    interrupted attempt, or a checkpoint of the same step from an abandoned branch of the run) is moved
    aside first and deleted afterwards."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.tmp-old-{secrets.token_hex(4)}")
        if (final / COMPLETE_MARKER).is_file():
            logger.warning("replacing existing checkpoint %s", final)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        _remove_tree(old)


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    epoch: int
    trainable: dict[str, torch.Tensor]
    data_state: dict[str, Any]
    extra: dict[str, Any]


def _check_files(path: Path) -> None:
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        raise _incomplete_error(path)
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as error:
        raise DiffusmithError(f"checkpoint {path} has an unreadable {COMPLETE_MARKER} marker ({error}); the "
                              "checkpoint is damaged, use an earlier one") from error
    for name, size in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            raise DiffusmithError(f"checkpoint {path} is damaged: {name} is missing or has the wrong size; use "
                                  "an earlier one")


def load_checkpoint(path: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None,
                    lr_scheduler: Any | None = None, restore_rng: bool = True, rank: int = 0,
                    num_processes: int | None = None, optimizer_per_rank: bool = False) -> LoadedCheckpoint:
    """Read a checkpoint folder. ``optimizer`` and ``lr_scheduler`` (built as for a fresh run, the scheduler
    after the optimizer) get their state loaded in place; the RNG states of process ``rank`` are restored
    unless ``restore_rng`` is False. A sharded optimizer state (FSDP, ZeRO) is read from process
    ``rank``'s own file and needs the ``num_processes`` it was saved with. The trainable weights come back
    on the CPU; copying them into the model is the caller's job."""
    path = Path(path)
    _check_files(path)
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    version = state.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DiffusmithError(f"checkpoint {path} has format version {version!r}, newer than this diffusmith "
                              f"reads ({FORMAT_VERSION}); update diffusmith")
    trainable = load_file(path / TRAINABLE_FILE)

    if optimizer is not None:
        shards = state.get("optimizer_shards")
        if bool(shards) != optimizer_per_rank:
            saved_how = f"sharded over {shards} processes" if shards else "whole (not sharded)"
            raise DiffusmithError(f"checkpoint {path} holds its optimizer state {saved_how}; resume it with the "
                                  "--sharding it was saved with")
        if shards:
            if (num_processes or 1) != shards:
                raise DiffusmithError(f"checkpoint {path} holds an optimizer state sharded over {shards} processes; "
                                      f"resume it with --num-processes {shards} and the same --sharding")
            saved = _read_optimizer_shard(path / _optimizer_shard_name(rank))
        elif state["optimizer"] is None:
            raise DiffusmithError(f"checkpoint {path} holds no optimizer state; resume without loading one")
        else:
            saved = optimizer_state_from_tensors(load_file(path / OPTIMIZER_FILE), state["optimizer"])
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as error:
            raise DiffusmithError(f"optimizer state in {path} does not fit this optimizer ({error}); were the "
                                  "trainable parameters or the optimizer changed since it was saved?") from error
    if lr_scheduler is not None:
        if state["lr_scheduler"] is None:
            raise DiffusmithError(f"checkpoint {path} holds no lr scheduler state; resume without loading one")
        lr_scheduler.load_state_dict(_decode(state["lr_scheduler"], None))
    if restore_rng:
        rng_file = path / _rng_file_name(rank)
        if rng_file.is_file():
            _restore_rng(rng_file)
        else:
            logger.warning("checkpoint %s has no RNG state for process %d (saved with %s processes); random "
                           "numbers will not continue exactly", path, rank, state.get("num_processes"))
    return LoadedCheckpoint(path=path, step=int(state["step"]), epoch=int(state["epoch"]), trainable=trainable,
                            data_state=_decode(state["data_state"], None), extra=_decode(state["extra"], None))
