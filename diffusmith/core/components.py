"""Loading one model component from a folder (config.json + weights) without double allocation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import DiffusmithError
from .loading import empty_weights, fill_module, load_config, load_state_dict

StateDict = dict[str, torch.Tensor]


def load_component(
    what: str,
    config: dict,
    weights: str | Path,
    build: Callable[[dict], nn.Module],
    dtype: torch.dtype,
    *,
    convert: Callable[[StateDict], StateDict] | None = None,
    allow_pickle: bool = False,
) -> nn.Module:
    """Build ``build(config)`` with empty (meta) parameters, then fill it from ``weights`` (file or folder)
    cast to ``dtype`` on the CPU; ``convert`` maps another key layout onto ours first."""
    with empty_weights():
        model = build(config)
    state_dict = load_state_dict(weights, allow_pickle=allow_pickle)
    if convert is not None:
        state_dict = convert(state_dict)
    model = fill_module(model, state_dict, what=what, dtype=dtype, device="cpu")
    return model.eval().requires_grad_(False)


def component_folder(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise DiffusmithError(f"missing component folder {folder}: a model in the official layout has "
                              "transformer/, vae/, text_encoder/, tokenizer/ and scheduler/")
    return folder


def component_config(root: Path, name: str) -> dict:
    return load_config(component_folder(root, name))
