"""Reading checkpoints and putting their tensors into models.

The path from disk to a working model is:

    with empty_weights():                 # parameters on the meta device: no memory, no random init
        model = Model(config)
    state = load_state_dict(folder)       # safetensors, memory-mapped: nothing is read yet
    fill_module(model, state, what="DiT", dtype=torch.bfloat16)   # check keys/shapes, then assign

Only safetensors is loaded by default. Pickle files (.bin/.pt/.pth/.ckpt) can run code when opened, so
they need an explicit ``allow_pickle=True`` (CLI: ``--allow-pickle``) and are then read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from diffusmith.errors import DiffusmithError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Bytes per element of the safetensors dtypes; a dtype missing here is accepted without a size check.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}
_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces


# ----------------------------------------------------------------------------------------------------
# Building a model without memory
# ----------------------------------------------------------------------------------------------------


@contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules whose parameters live on the meta device (shape and dtype, no storage).

    Buffers are created normally on the CPU, so tables computed in ``__init__`` (rotary frequencies,
    non-persistent buffers that no checkpoint holds) are real. Parameters move to meta the moment they are
    registered, before any ``reset_parameters`` runs, so random initialisation costs nothing.
    Works by patching ``nn.Module.register_parameter`` while the block runs: not thread-safe.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        param = module._parameters.get(name)
        if param is None or param.is_meta:
            return
        if type(param) is nn.Parameter:
            meta = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
        else:  # parameter subclasses take their attributes as constructor arguments
            meta = type(param)(param.data.to("meta"), requires_grad=param.requires_grad, **param.__dict__)
        module._parameters[name] = meta

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------------------
# Finding weight files
# ----------------------------------------------------------------------------------------------------

_EXPECTED = (
    "expected a .safetensors file, or a folder holding one (e.g. diffusion_pytorch_model.safetensors, "
    "model.safetensors) or sharded *.safetensors with their *.safetensors.index.json"
)


def find_weight_files(path: str | Path) -> list[Path]:
    """The weight files a path stands for, in load order.

    ``path`` may be a weight file, a ``*.index.json`` of a sharded checkpoint, or a folder. In a folder,
    safetensors win over pickles: a ``*.safetensors.index.json`` (every shard it names must exist), else
    every ``*.safetensors`` file (several files without an index are loaded together; a key present twice
    is an error at load time), else the same for pickle files (``pytorch_model.bin.index.json``, ``*.bin``,
    ``*.pt``, ``*.pth``, ``*.ckpt``), which ``load_state_dict`` refuses unless ``allow_pickle=True``.
    """
    return _resolve(Path(path).expanduser())[0]


def _resolve(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """(files, weight_map of the index or None)."""
    if not path.exists():
        raise DiffusmithError(f"{path} does not exist; {_EXPECTED}")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _shards_from_index(path)
        if path.suffix == ".safetensors" or path.suffix in PICKLE_SUFFIXES:
            return [path], None
        raise DiffusmithError(f"{path} is not a weight file; {_EXPECTED}")

    for suffixes in ((".safetensors",), PICKLE_SUFFIXES):
        indexes = sorted(p for s in suffixes for p in path.glob(f"*{s}.index.json") if p.is_file())
        if len(indexes) > 1:
            names = ", ".join(p.name for p in indexes)
            raise DiffusmithError(
                f"{path} holds several shard indexes ({names}); pass the path of the one to load"
            )
        if indexes:
            return _shards_from_index(indexes[0])
        files = sorted(p for s in suffixes for p in path.glob(f"*{s}") if p.is_file())
        if len(files) > 1:
            logger.info("%s: no shard index, loading %d files together", path, len(files))
        if files:
            return files, None

    with_weights = sorted(
        sub.name for sub in path.iterdir() if sub.is_dir() and any(sub.glob("*.safetensors*"))
    )
    hint = f" (its subfolders {', '.join(with_weights)} hold weights: pass one of them)" if with_weights else ""
    raise DiffusmithError(f"no weight files in {path}{hint}; {_EXPECTED}")


def _shards_from_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    data = _read_json(index, what="shard index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise DiffusmithError(f"{index} has no 'weight_map' table; it is not a shard index, or it is damaged")
    names = sorted(set(weight_map.values()))
    shards = [index.parent / name for name in names]
    missing = [name for name, shard in zip(names, shards, strict=False) if not shard.is_file()]
    if missing:
        listed = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DiffusmithError(
            f"{index.parent}: shard {listed} is missing ({len(missing)} of {len(names)} shards named in "
            f"{index.name}); the download is incomplete, download the missing files again"
        )
    return shards, weight_map


def _read_json(file: Path, *, what: str) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DiffusmithError(
            f"{file} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            f"fix the {what} or download it again"
        ) from None
    except UnicodeDecodeError:
        raise DiffusmithError(f"{file} is not valid JSON (not UTF-8 text); download the {what} again") from None
    if not isinstance(data, dict):
        raise DiffusmithError(f"{file} should hold a JSON object (the {what}), found {type(data).__name__}")
    return data


def load_config(folder: str | Path, name: str = "config.json") -> dict:
    """Read ``folder/name`` (or ``folder`` itself when it is a .json file) as a dict."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise DiffusmithError(f"{path} does not exist; expected a model folder holding {name}")
    file = path if path.is_file() else path / name
    if not file.is_file():
        raise DiffusmithError(f"{file} not found; the model folder should hold its {name} next to the weights")
    return _read_json(file, what=name)


# ----------------------------------------------------------------------------------------------------
# safetensors headers
# ----------------------------------------------------------------------------------------------------


def _corrupt(file: Path, detail: str) -> DiffusmithError:
    return DiffusmithError(f"{file} is corrupt or truncated ({detail}); delete it and download it again")


def _read_header(file: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse and check a safetensors header: (tensor entries, metadata).

    Layout: 8-byte little-endian header length n, n bytes of JSON, then the tensor data. The file must be
    exactly as long as the header says, which catches interrupted downloads before any tensor is touched.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(file, f"only {size} bytes, shorter than the header length field")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER_BYTES:
            raise _corrupt(file, f"the header claims {n} bytes, not a safetensors file")
        if 8 + n > size:
            raise _corrupt(file, f"the header needs {n} bytes but the file has {size - 8}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(file, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(file, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_end = 0
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = [int(d) for d in shape]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise _corrupt(file, f"bad header entry for {key}") from None
        if not 0 <= begin <= end or any(d < 0 for d in shape):
            raise _corrupt(file, f"bad offsets or shape for {key}")
        if dtype in _DTYPE_BYTES and end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise _corrupt(file, f"size of {key} does not match its shape and dtype")
        data_end = max(data_end, end)
    data_size = size - 8 - n
    if data_size != data_end:
        raise _corrupt(file, f"the header describes {data_end} bytes of tensor data, the file holds {data_size}")
    return header, metadata


def _safetensors_only(path: str | Path) -> list[Path]:
    files = find_weight_files(path)
    pickles = [f for f in files if f.suffix != ".safetensors"]
    if pickles:
        raise DiffusmithError(f"{pickles[0]} is not a .safetensors file; only safetensors headers can be read")
    return files


def read_safetensors_header(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, safetensors dtype name such as "BF16") for a file, shard index or folder,
    reading only the headers (no tensor data)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    origin: dict[str, Path] = {}
    for file in _safetensors_only(path):
        header, _ = _read_header(file)
        for key, entry in header.items():
            if key in out:
                raise _duplicate_error(key, origin[key], file)
            out[key] = (tuple(int(d) for d in entry["shape"]), str(entry["dtype"]))
            origin[key] = file
    return out


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The free-form ``__metadata__`` table of a safetensors file (e.g. LoRA rank/alpha); {} if none."""
    files = _safetensors_only(path)
    if len(files) != 1:
        raise DiffusmithError(f"{path} holds {len(files)} safetensors files; pass the single file to read")
    return dict(_read_header(files[0])[1])


def _duplicate_error(key: str, first: Path, second: Path) -> DiffusmithError:
    return DiffusmithError(
        f"tensor {key} is in both {first.name} and {second.name} ({second.parent}); these files are not "
        "shards of one checkpoint (two variants, e.g. fp16 and fp32?): keep one or pass a single file"
    )


# ----------------------------------------------------------------------------------------------------
# Loading state dicts
# ----------------------------------------------------------------------------------------------------


def load_state_dict(
    path: str | Path, *, allow_pickle: bool = False, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (file, shard index or folder; see find_weight_files), as a dict.

    safetensors files are memory-mapped: tensors on the CPU read their bytes from disk only when used.
    Pickle checkpoints are refused unless ``allow_pickle=True``.
    """
    files, weight_map = _resolve(Path(path).expanduser())
    pickles = [f for f in files if f.suffix != ".safetensors"]
    if pickles and not allow_pickle:
        raise DiffusmithError(
            f"{pickles[0]} is a pickle checkpoint ({pickles[0].suffix}), and opening a pickle can run "
            "arbitrary code; convert it to .safetensors, or if you trust its source pass allow_pickle=True "
            "(CLI: --allow-pickle)"
        )
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        part = _load_safetensors(file, device) if file.suffix == ".safetensors" else _load_pickle(file, device)
        for key, tensor in part.items():
            if key in state:
                raise _duplicate_error(key, origin[key], file)
            state[key] = tensor
            origin[key] = file
    if weight_map is not None:
        absent = [k for k in weight_map if k not in state]
        if absent:
            raise DiffusmithError(
                f"{path}: {len(absent)} tensors named in the shard index are not in the shards "
                f"(e.g. {', '.join(absent[:3])}); the files do not belong together, download them again"
            )
    return state


def _load_safetensors(file: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _read_header(file)  # clear message for truncated/corrupt files before the library sees them
    try:
        return load_file(file, device=str(device))
    except SafetensorError as exc:
        raise _corrupt(file, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _load_pickle(file: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    logger.info("loading pickle checkpoint %s (allow_pickle=True; only tensors are accepted)", file)
    try:
        # mmap needs the zip format of torch.save; the older format is read into memory.
        obj = torch.load(file, map_location=device, weights_only=True, mmap=zipfile.is_zipfile(file))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        message = str(exc)
        if "allowed global" in message or "Unsupported global" in message:
            raise DiffusmithError(
                f"{file} holds Python objects besides tensors, which diffusmith does not unpickle; "
                "re-save only its state_dict (as .safetensors) with the tool that made it"
            ) from None
        first = message.strip().splitlines()[0][:120] if message.strip() else type(exc).__name__
        raise _corrupt(file, first) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-style .ckpt
    if not isinstance(obj, dict):
        raise DiffusmithError(f"{file} holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if len(tensors) < len(obj):
        logger.info("%s: skipped %d entries that are not tensors", file, len(obj) - len(tensors))
    if not tensors:
        raise DiffusmithError(f"{file} holds no tensors")
    return tensors


# ----------------------------------------------------------------------------------------------------
# Filling a module
# ----------------------------------------------------------------------------------------------------


def fill_module(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    what: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
) -> nn.Module:
    """Put checkpoint tensors into ``module`` (typically built under ``empty_weights()``) and return it.

    Keys and shapes are checked first; a mismatch raises one DiffusmithError line naming examples and,
    when the checkpoint is recognised, what it looks like. ``what`` names the component in messages.

    Tensors are assigned, not copied: each one is cast (floating point only, to ``dtype``; None keeps the
    checkpoint's dtype) and moved (to ``device``; None keeps it where it is) on its own, so no second copy
    of the whole checkpoint is ever built. Non-persistent buffers are moved to ``device`` but keep their dtype.

    ``strict=False`` ignores unexpected keys and accepts missing ones *only* when the module already holds
    real values for them (it was not built under empty_weights, or they are buffers); a missing key whose
    parameter is still on meta is an error either way. Shape mismatches are always errors. Parameters and
    buffers that are one tensor (tied weights) stay tied; one key of a tied group is enough.
    """
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise DiffusmithError(f"{what}: checkpoint entry {key} is a {type(value).__name__}, not a tensor")
        if value.is_meta:
            raise DiffusmithError(f"{what}: checkpoint entry {key} is on the meta device (it holds no data)")
    slots = _state_slots(module)
    groups: dict[int, list[str]] = {}
    for key, (_owner, _name, tensor) in slots.items():
        groups.setdefault(id(tensor), []).append(key)

    covered = {k for keys in groups.values() if any(k2 in state_dict for k2 in keys) for k in keys}
    missing = [k for k in slots if k not in covered]
    unexpected = [k for k in state_dict if k not in slots]
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(slots[k][2].shape))
        for k in slots
        if k in state_dict and tuple(state_dict[k].shape) != tuple(slots[k][2].shape)
    ]
    if not strict:
        if unexpected:
            logger.warning("%s: ignoring %d unexpected keys (e.g. %s)", what, len(unexpected), unexpected[0])
        missing = [k for k in missing if slots[k][2].is_meta]
        unexpected = []
    if missing or unexpected or mismatched:
        raise _mismatch_error(what, state_dict, slots, missing, unexpected, mismatched)

    for keys in groups.values():
        source = next((k for k in keys if k in state_dict), None)
        old = slots[keys[0]][2]
        tensor = state_dict[source] if source is not None else old
        new = _convert(tensor, dtype, device)
        if source is None and new is old:  # strict=False: already real, right dtype and device
            continue
        new = new.detach()
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad and (new.is_floating_point() or new.is_complex()))
        for key in keys:
            owner, name, _ = slots[key]
            # Straight into the tables: setattr would go through register_parameter, which empty_weights
            # patches when fill_module is called inside that block.
            (owner._parameters if isinstance(old, nn.Parameter) else owner._buffers)[name] = new

    if device is not None:
        for owner in module.modules():
            for name in owner._non_persistent_buffers_set:
                buf = owner._buffers.get(name)
                if buf is not None:
                    owner._buffers[name] = buf.to(device)

    left = [n for n, p in module.named_parameters() if p.is_meta]
    left += [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise DiffusmithError(
            f"{what}: {len(left)} tensors are still on the meta device after loading (e.g. "
            f"{', '.join(left[:3])}); the model builds them without weights and no checkpoint key fills them"
        )
    return module


def _state_slots(module: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """key -> (owning module, attribute name, current tensor), for every entry of ``module.state_dict()``."""
    slots: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, param in owner._parameters.items():
            if param is not None:
                slots[dot + name] = (owner, name, param)
        for name, buf in owner._buffers.items():
            if buf is not None and name not in owner._non_persistent_buffers_set:
                slots[dot + name] = (owner, name, buf)
    return slots


def _convert(tensor: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device | None) -> torch.Tensor:
    kwargs: dict = {}
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        kwargs["dtype"] = dtype
    if device is not None and tensor.device != torch.device(device):
        kwargs["device"] = device
    return tensor.to(**kwargs) if kwargs else tensor


def _examples(items: list[str]) -> str:
    return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _mismatch_error(
    what: str,
    state_dict: Mapping[str, torch.Tensor],
    slots: Mapping[str, tuple[nn.Module, str, torch.Tensor]],
    missing: list[str],
    unexpected: list[str],
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
) -> DiffusmithError:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {_examples(unexpected)})")
    if mismatched:
        shown = [f"{k}: ckpt {_shape(c)} vs model {_shape(m)}" for k, c, m in mismatched]
        parts.append(f"{len(mismatched)} shape mismatches (e.g. {_examples(shown)})")
    hint = _mismatch_hint(state_dict, slots)
    return DiffusmithError(f"{what}: checkpoint does not match: {', '.join(parts)}; {hint}")


def _mismatch_hint(state_dict: Mapping[str, torch.Tensor], slots: Mapping[str, object]) -> str:
    from diffusmith.core.signatures import identify  # signatures imports this module

    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    match = identify(shapes)
    if match is not None:
        size = "" if match.exact else " of another size"
        where = f", keys prefixed {match.prefix!r}" if match.prefix else ""
        return f"it looks like a {match.name} checkpoint{size} ({match.describe}{where})"
    prefix = _extra_prefix(list(state_dict), slots)
    if prefix:
        return f"the checkpoint keys start with {prefix!r}, which the model does not use; strip it"
    return "check that the file is this component's checkpoint and that the model config matches it"


def _extra_prefix(ckpt_keys: list[str], slots: Mapping[str, object]) -> str | None:
    """A prefix that, removed from the checkpoint keys, makes most of them model keys."""
    for key in ckpt_keys[:20]:
        for i, char in enumerate(key):
            if char == "." and key[i + 1:] in slots:
                prefix = key[: i + 1]
                hits = sum(k.startswith(prefix) and k[len(prefix):] in slots for k in ckpt_keys)
                if hits * 2 >= len(slots):
                    return prefix
    return None
