"""Tell which model a loose checkpoint file holds, from the names and shapes of its tensors.

A *signature* is data: a few tensor names (and optionally their shapes) that only one kind of checkpoint
has. Model families register theirs in ``diffusmith/models/<family>/signatures.py``; this module knows no
family by name. Single-file checkpoints from other tools often put a prefix in front of every key
(ComfyUI: ``model.diffusion_model.``), so a signature lists the prefixes under which it may appear.

Tiny test models have the same key names as the real ones but other shapes. A signature registered with
``any_size=True`` still matches them; its shapes then only rank candidates: a file whose shapes are the
real ones scores higher than one that only has the right structure.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from diffusmith.errors import DiffusmithError

logger = logging.getLogger(__name__)

# Prefixes that single-file checkpoints of a diffusion transformer carry (ComfyUI, original repos,
# diffusers pipelines saved as one file). Families may pass this to register_signature(prefixes=...).
DIFFUSION_MODEL_PREFIXES: tuple[str, ...] = ("", "model.diffusion_model.", "diffusion_model.", "transformer.")


@dataclass(frozen=True)
class Signature:
    name: str
    required: Mapping[str, tuple[int, ...] | None]
    prefixes: tuple[str, ...] = ("",)
    describe: str = ""
    any_size: bool = False


@dataclass(frozen=True)
class Match:
    """A signature found in a checkpoint.

    ``prefix`` is what stands in front of the signature's keys in the file (strip it to get model keys);
    ``exact`` is False when the structure matched but some required shape did not (a resized variant).
    """

    name: str
    prefix: str
    describe: str
    exact: bool = True
    score: tuple[int, int] = field(default=(0, 0), compare=False, repr=False)


_REGISTRY: dict[str, Signature] = {}
_families_loaded = False


def register_signature(
    name: str,
    *,
    required: Mapping[str, tuple[int, ...] | None],
    prefixes: Sequence[str] = ("",),
    describe: str = "",
    any_size: bool = False,
) -> Signature:
    """Add a signature: the checkpoint is ``name`` when every key in ``required`` exists (after one of
    ``prefixes``) with the given shape (None = any shape).

    ``any_size=True`` also matches tiny/resized variants of the same architecture: shapes then rank
    matches instead of deciding them. Registering the same name twice with another definition is an error.
    """
    if not required:
        raise ValueError(f"signature {name!r} needs at least one required key")
    if isinstance(prefixes, str):
        raise TypeError(f"signature {name!r}: prefixes must be a sequence of strings, not a string")
    sig = Signature(
        name=name,
        required={k: (None if s is None else tuple(int(d) for d in s)) for k, s in required.items()},
        prefixes=tuple(prefixes),
        describe=describe,
        any_size=any_size,
    )
    old = _REGISTRY.get(name)
    if old is not None and old != sig:
        raise ValueError(f"a different signature named {name!r} is already registered")
    _REGISTRY[name] = sig
    return sig


def unregister_signature(name: str) -> None:
    """Remove a signature (for tests and experiments); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def registered_signatures() -> dict[str, Signature]:
    """A copy of the registry, after loading every family's signatures."""
    load_family_signatures()
    return dict(_REGISTRY)


def load_family_signatures() -> None:
    """Import ``diffusmith.models.<family>.signatures`` for every family folder that has one.

    Discovery by convention, so that adding a family needs no edit here."""
    global _families_loaded
    if _families_loaded:
        return
    _families_loaded = True
    try:
        from diffusmith import models
    except ImportError:  # pragma: no cover - the package always ships models/
        return
    for info in pkgutil.iter_modules(models.__path__):
        if not info.ispkg:
            continue
        module_name = f"{models.__name__}.{info.name}.signatures"
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # the file exists but one of its imports is missing
                raise
            logger.debug("model family %s registers no signatures", info.name)


def _score(sig: Signature, shapes: Mapping[str, tuple[int, ...]], prefix: str) -> tuple[int, int] | None:
    """(number of shapes matched exactly, number of keys) or None when the signature does not apply."""
    exact = 0
    for key, want in sig.required.items():
        have = shapes.get(prefix + key)
        if have is None:
            return None
        if want is None:
            continue
        if tuple(have) == want:
            exact += 1
        elif not sig.any_size:
            return None
    return exact, len(sig.required)


def identify_all(shapes: Mapping[str, Sequence[int]]) -> list[Match]:
    """Every registered signature found in ``shapes`` (key -> shape), most specific first.

    Specificity: more required shapes matched exactly, then more required keys, then no prefix before a
    prefix, then registration order. A file that bundles several models (DiT + VAE + text encoder)
    yields one match per model."""
    load_family_signatures()
    shapes = {k: tuple(v) for k, v in shapes.items()}
    found: list[tuple[tuple[int, int, int, int], Match]] = []
    for order, sig in enumerate(_REGISTRY.values()):
        for prefix_rank, prefix in enumerate(sig.prefixes):
            score = _score(sig, shapes, prefix)
            if score is None:
                continue
            n_shaped = sum(s is not None for s in sig.required.values())
            match = Match(sig.name, prefix, sig.describe, exact=score[0] == n_shaped, score=score)
            found.append(((-score[0], -score[1], prefix_rank, order), match))
            break  # the first prefix that fits is the one the file uses
    found.sort(key=lambda item: item[0])
    return [m for _, m in found]


def identify(shapes: Mapping[str, Sequence[int]]) -> Match | None:
    """The most specific registered signature found in ``shapes`` (key -> shape), or None."""
    matches = identify_all(shapes)
    return matches[0] if matches else None


def identify_file(path: str | Path) -> Match:
    """Identify a safetensors checkpoint from its header alone (no tensor is read).

    Raises DiffusmithError when no registered signature matches."""
    from diffusmith.core.loading import read_safetensors_header  # loading imports us for its hints

    header = read_safetensors_header(path)
    match = identify({k: shape for k, (shape, _dtype) in header.items()})
    if match is None:
        first = ", ".join(list(header)[:5]) or "none"
        raise DiffusmithError(
            f"cannot tell which model {path} is: {len(header)} tensors, first keys {first}; "
            "pass the model type explicitly or use the official folder layout"
        )
    return match
