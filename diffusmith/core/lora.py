"""LoRA files and LoRA layers, for any model (no model-family knowledge here).

A LoRA adds ``scale * up @ down`` to the weight of some ``nn.Linear`` modules, with ``down`` ``(r, in)``,
``up`` ``(out, r)`` and ``scale = alpha / r`` (1 when the file gives no alpha). The files users meet spell
the same thing in several ways (see ../shared/REFERENCE.md); :func:`read_lora` turns any of them into one
canonical table ``{module name: LoraPair}``, with module names as the target model names its modules.

- Inference: ``apply_lora(model, read_lora(path, model), scale)`` merges the LoRA into the weights (no cost
  per step); :func:`remove_lora` subtracts it again.
- Training: :func:`inject_lora` wraps the target Linears in merge-free :class:`~.lora_layer.LoraLinear` layers
  (B = 0, so the model starts unchanged); :func:`lora_state_dict` takes the trained pairs out and
  :func:`save_lora` writes them with diffusers' keys and header, which diffusers' ``load_lora_weights`` and
  ComfyUI both read.

Which modules a model trains by default is declared on the model (e.g. ``QwenImageDiT.default_lora_targets``),
not here. Nothing here needs peft; peft's key and header conventions are what the files follow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import DiffusmithError, is_finite_number
from .devices import resolve_dtype
from .fp8 import Fp8Linear
from .loading import find_weight_files, load_state_dict, read_safetensors_metadata
from .lora_layer import LoraLinear

__all__ = [
    "LoraPair",
    "LoraWeights",
    "apply_lora",
    "find_lora_targets",
    "inject_lora",
    "lora_state_dict",
    "read_lora",
    "remove_lora",
    "save_lora",
    "set_lora_weights",
]

logger = logging.getLogger(__name__)

# The safetensors header entry diffusers writes and reads: a JSON LoraConfig, keys prefixed per component.
METADATA_KEY = "lora_adapter_metadata"
# Prefixes in front of module names, dotted (diffusers, ComfyUI, peft's PeftModel) or flattened (kohya).
_DOTTED_PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.")
_FLAT_PREFIXES = ("lora_unet_", "lycoris_")
# Text-encoder LoRA tensors (kohya ``lora_te*_``, diffusers ``text_encoder*.``): not applied, only reported.
_TEXT_ENCODER_KEY = re.compile(r"^(lora_te\d?_|text_encoders?(_\d)?\.)")
# <module>.lora_A.weight | <module>.lora_A.<adapter>.weight | <module>.lora_down.weight | <module>.alpha
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight|lora_(?P<du>down|up)\.weight"
    r"|(?P<alpha>alpha))$"
)
_MERGED_ATTR = "_diffusmith_merged_loras"  # on a model: [(LoraWeights, scale)] merged by apply_lora


@dataclass(frozen=True)
class LoraPair:
    """One LoRA'd Linear: ``delta W = (alpha / rank) * up @ down`` (``alpha=None`` means scale 1)."""

    down: torch.Tensor  # (r, in)   lora_A / lora_down
    up: torch.Tensor  # (out, r)    lora_B / lora_up
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``scale * up @ down`` in float32, ``(out, in)``."""
        up = self.up.to(device=device, dtype=torch.float32)
        down = self.down.to(device=device, dtype=torch.float32)
        return (up @ down) * self.scale


LoraWeights = dict[str, LoraPair]  # module name (as the target model names it) -> pair


def _examples(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


# ----------------------------------------------------------------------------------------------------
# Reading any LoRA file
# ----------------------------------------------------------------------------------------------------


def read_lora(path: str | Path, model: nn.Module | None = None, *, allow_pickle: bool = False) -> LoraWeights:
    """Parse a LoRA file (or a folder holding one) in any common key style into ``{module: LoraPair}``.

    Styles: diffusers/peft ``transformer.X.lora_A.weight`` (alpha from the ``lora_adapter_metadata`` header
    when present), ComfyUI ``diffusion_model.X.lora_A.weight`` (+ ``X.alpha``), peft ``X.lora_A.default.weight``,
    kohya/musubi ``lora_unet_X_with_underscores.lora_down.weight`` / ``.lora_up.weight`` + ``.alpha``.
    Flattened kohya names are mapped back to dotted names with the module names of ``model``, which those
    files therefore need. Text-encoder tensors (``lora_te_*``) are ignored with one warning. Pickle files are
    refused unless ``allow_pickle=True``.
    """
    state = load_state_dict(path, allow_pickle=allow_pickle)
    config = _adapter_config(path)

    text_keys = [k for k in state if _TEXT_ENCODER_KEY.match(k)]
    if text_keys:
        logger.warning("%s: ignoring %d text-encoder LoRA tensors (e.g. %s); diffusmith applies LoRA to the "
                       "diffusion model only", path, len(text_keys), text_keys[0])
    dora = [k for k in state if "dora_scale" in k or "lora_magnitude_vector" in k]
    if dora:
        raise DiffusmithError(f"{path} is a DoRA (e.g. {dora[0]}), which diffusmith does not apply; use a plain "
                              "LoRA")

    flat_names = _flat_module_names(model) if model is not None else None
    model_names = {n for n, _ in model.named_modules()} if model is not None else None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    adapters: set[str] = set()
    for key, tensor in state.items():
        if key in text_keys:
            continue
        match = _LORA_KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        if match["adapter"]:
            adapters.add(match["adapter"])
        part = "alpha" if match["alpha"] else "down" if match["ab"] == "A" or match["du"] == "down" else "up"
        module = _module_name(match["module"], path, model_names, flat_names)
        slot = parts.setdefault(module, {})
        if part in slot:
            raise DiffusmithError(f"{path}: two tensors give the {part} weight of {module} (one is {key}); the "
                                  "file mixes key styles, keep one")
        slot[part] = tensor
    if unknown:
        raise DiffusmithError(
            f"{path}: {len(unknown)} keys are not LoRA weights of a known style (e.g. {_examples(unknown)}); "
            "diffusmith reads lora_A/lora_B (diffusers, peft, ComfyUI) and lora_down/lora_up/alpha (kohya)"
        )
    if len(adapters) > 1:
        raise DiffusmithError(f"{path} holds several peft adapters ({', '.join(sorted(adapters))}); "
                              "save each adapter to its own file")
    if not parts:
        raise DiffusmithError(f"{path} holds no LoRA weights for the diffusion model")

    lora: LoraWeights = {}
    for module, slot in parts.items():
        if "down" not in slot or "up" not in slot:
            have = ", ".join(sorted(slot))
            raise DiffusmithError(f"{path}: {module} has only {have} (a LoRA needs both down/lora_A and "
                                  "up/lora_B); the file is incomplete")
        down, up = slot["down"], slot["up"]
        if down.ndim != 2 or up.ndim != 2:
            raise DiffusmithError(f"{path}: {module} has {down.ndim}-D/{up.ndim}-D LoRA weights; only LoRAs of "
                                  "Linear layers (2-D weights) are supported")
        if up.shape[1] != down.shape[0]:
            raise DiffusmithError(f"{path}: {module} has down {tuple(down.shape)} and up {tuple(up.shape)}, "
                                  "whose ranks differ; the file is damaged")
        if "alpha" in slot:
            alpha: float | None = float(slot["alpha"].float().item())
        else:
            alpha = _alpha_from_config(config, module, down.shape[0])
        lora[module] = LoraPair(down=down, up=up, alpha=alpha)
    return lora


def _flat_module_names(model: nn.Module) -> dict[str, str | None]:
    """``a_b_c`` -> ``a.b_c`` for every module; None where two module names flatten to the same text."""
    flat: dict[str, str | None] = {}
    for name, _ in model.named_modules():
        key = name.replace(".", "_")
        flat[key] = name if flat.get(key, name) == name else None
    return flat


def _module_name(raw: str, path: str | Path, model_names: set[str] | None,
                 flat_names: dict[str, str | None] | None) -> str:
    """The target model's name for the module part of a LoRA key."""
    for prefix in _FLAT_PREFIXES:
        if raw.startswith(prefix):
            if flat_names is None:
                raise DiffusmithError(f"{path} is a kohya-style LoRA ({raw}...): its module names have dots "
                                      "turned into underscores, so it can only be read for a given model "
                                      "(read_lora(path, model))")
            stem = raw[len(prefix):]
            if stem in flat_names and flat_names[stem] is None:
                raise DiffusmithError(f"{path}: {raw} could name several modules of the model once underscores "
                                      "are read as dots; convert the file to dotted names")
            return flat_names.get(stem) or stem  # unknown names stay as they are; apply_lora reports them
    if model_names is not None and raw in model_names:
        return raw
    for prefix in _DOTTED_PREFIXES:
        if raw.startswith(prefix):
            return raw[len(prefix):]
    return raw


def _adapter_config(path: str | Path) -> dict:
    """diffusers' LoraConfig from the header (``lora_adapter_metadata``), un-prefixed; {} when absent."""
    files = [f for f in find_weight_files(path) if f.suffix == ".safetensors"]
    if len(files) != 1:
        return {}
    raw = read_safetensors_metadata(files[0]).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        table = json.loads(raw)
    except json.JSONDecodeError:
        logger.warning("%s: unreadable %s header entry, ignored (LoRA scale 1)", path, METADATA_KEY)
        return {}
    if not isinstance(table, dict):
        return {}
    # Pipeline-level files prefix each field with the component ("transformer.r"); model-level ones do not.
    groups: dict[str, dict] = {}
    for key, value in table.items():
        component, _, field = key.rpartition(".")
        groups.setdefault(component, {})[field] = value
    for component in ("transformer", "", *groups):
        if component in groups and not component.startswith("text_encoder"):
            return groups[component]
    return {}


def _pattern_value(patterns: Mapping[str, object] | None, module: str) -> object | None:
    """peft's rule: a pattern matches the module name's end, on a dot boundary (patterns are regexes)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _alpha_from_config(config: dict, module: str, rank: int) -> float | None:
    if not config:
        return None
    if config.get("use_dora"):
        raise DiffusmithError("the LoRA's header says it is a DoRA (use_dora), which diffusmith does not apply")
    alpha = _pattern_value(config.get("alpha_pattern"), module)
    if alpha is None:
        alpha = config.get("lora_alpha")
    if alpha is None:
        return None
    alpha = float(alpha)
    if config.get("use_rslora"):  # scale alpha / sqrt(r), written as alpha' / r
        alpha *= math.sqrt(rank)
    return alpha


# ----------------------------------------------------------------------------------------------------
# Merging into a model (inference)
# ----------------------------------------------------------------------------------------------------


def _linear_for(module: nn.Module) -> nn.Module:
    """The Linear that holds the weight: the module itself, or the base layer of a LoRA layer."""
    return getattr(module, "base_layer", module)


def apply_lora(model: nn.Module, lora: LoraWeights, scale: float = 1.0) -> None:
    """Add ``scale * (alpha / r) * up @ down`` to each target Linear's weight, in place.

    The sum is taken in float32 and cast back to the weight's dtype, on the weight's device. Every module
    and shape is checked before any weight changes. The LoRA is recorded on the model for :func:`remove_lora`.
    """
    if not is_finite_number(scale):
        raise DiffusmithError(f"LoRA scale must be a finite number, got {scale!r}")
    scale = float(scale)
    modules = dict(model.named_modules())
    missing = [name for name in lora if name not in modules]
    if missing:
        raise DiffusmithError(
            f"{len(missing)} of the LoRA's {len(lora)} modules are not in the {type(model).__name__} "
            f"(e.g. {_examples(missing)}); the LoRA is made for another model"
        )
    problems = []
    for name, pair in lora.items():
        weight = getattr(_linear_for(modules[name]), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            problems.append(f"{name} is not a Linear layer")
        elif weight.is_meta:
            problems.append(f"{name} has no weights loaded (meta device)")
        elif tuple(weight.shape) != (pair.up.shape[0], pair.down.shape[1]):
            problems.append(f"{name}: LoRA makes ({pair.up.shape[0]}, {pair.down.shape[1]}), "
                            f"weight is {tuple(weight.shape)}")
    if problems:
        raise DiffusmithError(f"the LoRA does not fit the {type(model).__name__}: {len(problems)} modules "
                              f"({_examples(problems)}); is it made for another model or size?")
    _merge(model, modules, lora, scale)
    model.__dict__.setdefault(_MERGED_ATTR, []).append((lora, scale))


def _merge(model: nn.Module, modules: Mapping[str, nn.Module], lora: LoraWeights, scale: float) -> None:
    with torch.no_grad():
        for name, pair in lora.items():
            layer = _linear_for(modules[name])
            weight = layer.weight
            if isinstance(layer, Fp8Linear):  # fp8 storage: dequantized, summed, quantized again
                layer.add_(pair.delta(weight.device) * scale)
                continue
            merged = weight.float() + pair.delta(weight.device) * scale
            weight.copy_(merged)  # in place: offload hooks keep pointing at the same storage


def remove_lora(model: nn.Module) -> int:
    """Undo every :func:`apply_lora` on ``model`` (newest first) by subtracting the same deltas.

    Exact up to float32 rounding for float32 weights; bf16/fp16 weights come back within one rounding step
    (a second cast). Returns how many LoRAs were removed.
    """
    merged = model.__dict__.pop(_MERGED_ATTR, [])
    modules = dict(model.named_modules())
    for lora, scale in reversed(merged):
        _merge(model, modules, lora, -scale)
    return len(merged)


# ----------------------------------------------------------------------------------------------------
# LoRA layers for training
# ----------------------------------------------------------------------------------------------------


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def find_lora_targets(model: nn.Module, targets: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """Names of the Linear modules a LoRA on ``targets`` covers.

    A target pattern matches a module whose name equals it or ends with ``"." + pattern`` (peft's rule:
    ``"to_q"`` matches every block's ``attn.to_q``). ``exclude`` names modules (or parents of modules) left
    out. A pattern that matches no Linear at all is an error, so typos do not train nothing silently.
    """
    targets, exclude = list(targets), list(exclude)
    if not targets:
        raise DiffusmithError("no LoRA target modules given")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    unmatched = [t for t in targets if not any(_matches(n, t) for n in linears)]
    if unmatched:
        raise DiffusmithError(f"LoRA target(s) {', '.join(unmatched)} match no Linear layer of the "
                              f"{type(model).__name__} (its Linears are named like {_examples(linears, 2)})")
    chosen = [n for n in linears if any(_matches(n, t) for t in targets)]
    return [n for n in chosen if not any(n == e or n.startswith(e + ".") for e in exclude)]


def _lora_layers(model: nn.Module, adapter_name: str) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear) and m.adapter_name == adapter_name}


def inject_lora(model: nn.Module, targets: Iterable[str], rank: int, alpha: float | None = None,
                adapter_name: str = "default", exclude: Iterable[str] = ()) -> list[str]:
    """Replace the target Linears of ``model`` (in place) with :class:`LoraLinear` layers of ``rank`` and
    ``alpha`` (None = rank, scale 1); ``lora_B`` starts at zero so the model's output is unchanged.

    Returns the wrapped module names. Every weight of ``model`` is frozen afterwards except the LoRA's
    (float32)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise DiffusmithError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha):
        raise DiffusmithError(f"LoRA alpha must be a finite number, got {alpha}")
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise DiffusmithError(f"the {type(model).__name__} already has LoRA layers; train one LoRA at a time")
    names = find_lora_targets(model, targets, exclude)
    if not names:
        raise DiffusmithError("every LoRA target module is excluded; nothing would train")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoraLinear(getattr(parent, attr), rank, alpha, adapter_name))
    return names


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> LoraWeights:
    """The LoRA pairs of a model with LoRA layers (detached, not copied), alpha included."""
    layers = _lora_layers(model, adapter_name)
    if not layers:
        raise DiffusmithError(f"the {type(model).__name__} has no LoRA layers (adapter {adapter_name!r}); "
                              "call inject_lora first")
    return {name: LoraPair(down=layer.down.detach(), up=layer.up.detach(), alpha=layer.alpha)
            for name, layer in layers.items()}


def set_lora_weights(model: nn.Module, lora: LoraWeights, adapter_name: str = "default") -> None:
    """Copy LoRA pairs into a model's LoRA layers (e.g. to start training from a LoRA file).

    The layers keep their own alpha: ``up`` is rescaled so that each layer's delta equals the file's."""
    layers = _lora_layers(model, adapter_name)
    bad = [n for n in lora if n not in layers]
    if bad:
        raise DiffusmithError(f"{len(bad)} LoRA modules have no LoRA layer in the model (e.g. {_examples(bad)}); "
                              "inject_lora on the same targets first")
    with torch.no_grad():
        for name, pair in lora.items():
            layer = layers[name]
            down, up = layer.down, layer.up
            if down.shape != pair.down.shape or up.shape != pair.up.shape:
                raise DiffusmithError(f"{name}: LoRA of rank {pair.rank} {tuple(pair.up.shape)}x"
                                      f"{tuple(pair.down.shape)} does not fit the layer's rank {down.shape[0]} "
                                      f"{tuple(up.shape)}x{tuple(down.shape)}")
            down.copy_(pair.down)
            up.copy_(pair.up.float() * (pair.scale / layer.scale))


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def save_lora(path: str | Path, lora: nn.Module | Mapping[str, LoraPair], rank: int | None = None,
              alpha: float | None = None, *, prefix: str = "transformer.", dtype: torch.dtype | str = torch.float32,
              adapter_name: str = "default") -> Path:
    """Write a LoRA as ``<prefix><module>.lora_A.weight`` / ``.lora_B.weight`` safetensors with diffusers'
    ``lora_adapter_metadata`` header (r, lora_alpha, target_modules, ...), atomically.

    ``lora`` is a model with LoRA layers (see :func:`inject_lora`) or a ``{module: LoraPair}`` table.
    ``rank`` and ``alpha``, when given, are checked against the weights (and for pairs without an alpha,
    ``alpha`` is theirs).

    The scale ``alpha / r`` is folded into ``lora_B`` and the header says ``lora_alpha = r``: ComfyUI reads
    no header (only ``.alpha`` tensors), and diffusers' loader mis-prefixes ``transformer.*.alpha`` tensors,
    so a file whose weights already carry the scale is the one form every loader applies identically.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DiffusmithError(f"LoRA output {path} must end in .safetensors")
    dtype = resolve_dtype(dtype)
    pairs = lora_state_dict(lora, adapter_name) if isinstance(lora, nn.Module) else dict(lora)
    if not pairs:
        raise DiffusmithError("no LoRA weights to save")
    if rank is not None:
        other = sorted({p.rank for p in pairs.values()} - {rank})
        if other:
            raise DiffusmithError(f"save_lora(rank={rank}) but the LoRA weights have rank {other[0]}")
    if alpha is not None:
        wrong = [n for n, p in pairs.items() if p.alpha is not None and not math.isclose(p.alpha, alpha)]
        if wrong:
            raise DiffusmithError(f"save_lora(alpha={alpha}) but {wrong[0]} has alpha {pairs[wrong[0]].alpha}")

    tensors: dict[str, torch.Tensor] = {}
    for name, pair in pairs.items():
        scale = pair.scale if pair.alpha is not None else (1.0 if alpha is None else alpha / pair.rank)
        up = pair.up.detach().float() * scale if scale != 1.0 else pair.up.detach()
        tensors[f"{prefix}{name}.lora_A.weight"] = pair.down.detach().to("cpu", dtype).contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = up.to("cpu", dtype).contiguous()

    ranks = Counter(p.rank for p in pairs.values())
    common = ranks.most_common(1)[0][0]
    # peft reads pattern keys as regexes: escape the names so each matches its own module only
    rank_pattern = {re.escape(n): p.rank for n, p in pairs.items() if p.rank != common}
    config = {"r": common, "lora_alpha": common, "rank_pattern": rank_pattern, "alpha_pattern": dict(rank_pattern),
              "target_modules": sorted(pairs), "lora_dropout": 0.0, "bias": "none", "use_dora": False,
              "use_rslora": False, "lora_bias": False}
    component = prefix.rstrip(".")
    packed = {f"{component}.{k}" if component else k: v for k, v in config.items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
