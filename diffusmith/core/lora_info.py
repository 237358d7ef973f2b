"""What a LoRA file holds, from its safetensors header alone (``diffusmith inspect``): the key style, the
modules, the rank and the dtype. No tensor is read, and no model is needed.

The base model is not named: module names alone do not tell families apart (Qwen-Image and FLUX both have
``transformer_blocks.N.attn.add_q_proj``), so the description lists the modules and leaves the model to
the user; ``generate --lora`` checks the names against the model it loads.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

from .lora import _DOTTED_PREFIXES, _FLAT_PREFIXES, _LORA_KEY, _TEXT_ENCODER_KEY

__all__ = ["describe_lora_header"]

_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2"}


def describe_lora_header(header: Mapping[str, tuple[tuple[int, ...], str]]) -> str | None:
    """One line on the LoRA a safetensors header describes (key -> (shape, safetensors dtype name), as
    :func:`~.loading.read_safetensors_header` reads it), or None when its keys are not all LoRA keys (it is
    some other checkpoint)."""
    text = [k for k in header if _TEXT_ENCODER_KEY.match(k)]
    matches = {k: _LORA_KEY.match(k) for k in header if k not in text}
    if not matches or any(m is None for m in matches.values()):
        return None
    ranks: Counter[int] = Counter()
    modules: set[str] = set()
    styles: set[str] = set()
    has_alpha = False
    for key, match in matches.items():
        modules.add(match["module"])
        if match["alpha"]:
            has_alpha = True
            continue
        styles.add("lora_A/lora_B" if match["ab"] else "lora_down/lora_up")
        if match["ab"] == "A" or match["du"] == "down":
            ranks[header[key][0][0]] += 1
    if not ranks:
        return None  # only alpha tensors
    names = sorted(modules)
    prefix = _common_prefix(names)
    shown = [n[len(prefix):] for n in names[:3]]
    rank = (f"rank {next(iter(ranks))}" if len(ranks) == 1
            else "ranks " + ", ".join(f"{r} ({_count(n, 'module')})" for r, n in sorted(ranks.items())))
    dtypes = sorted({_DTYPE_NAMES.get(dtype, dtype) for _, dtype in header.values()})
    params = sum(math.prod(shape) for key, (shape, _) in header.items() if key in matches)
    parts = [f"LoRA ({' and '.join(sorted(styles))} keys"
             f"{f' under {prefix!r}' if prefix else ''}{', with alpha tensors' if has_alpha else ''})",
             f"{_count(len(names), 'module')} (e.g. {', '.join(shown)}{', ...' if len(names) > 3 else ''})",
             rank, "/".join(dtypes), f"{params / 1e6:.2f}M parameters"]
    if text:
        parts.append(f"and {_count(len(text), 'text-encoder tensor')} (not applied by diffusmith)")
    return ", ".join(parts)


def _common_prefix(names: list[str]) -> str:
    """The known key prefix (``transformer.``, ``diffusion_model.``, ``lora_unet_``, ...) all names share."""
    for prefix in (*_DOTTED_PREFIXES, *_FLAT_PREFIXES):
        if all(n.startswith(prefix) for n in names):
            return prefix
    return ""


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
