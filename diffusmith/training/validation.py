"""Validation samples during training: the inference pipeline itself, saved as one grid per step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..pipelines.base import BasePipeline


@dataclass
class ValidationSpec:
    prompts: Sequence[str] = ()
    every: int | None = None
    height: int = 512
    width: int = 512
    steps: int = 20
    cfg_scale: float = 4.0
    negative_prompt: str = ""
    seed: int = 0

    def due(self, step: int) -> bool:
        return bool(self.prompts) and bool(self.every) and step % self.every == 0


def make_grid(images: Sequence[Image.Image]) -> Image.Image:
    """Images side by side in a near-square grid (all cells the size of the first image)."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image.resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid


def render_validation(pipe: BasePipeline, spec: ValidationSpec, step: int, folder: Path, write: bool = True) -> Path:
    """Sample every validation prompt with the same settings a user would use at inference. ``write=False``
    samples without saving (a process that only helps a sharded model run)."""
    images = [pipe(prompt=prompt, negative_prompt=spec.negative_prompt, cfg_scale=spec.cfg_scale,
                   height=spec.height, width=spec.width, num_inference_steps=spec.steps, seed=spec.seed,
                   progress_bar=False)
              for prompt in spec.prompts]
    path = folder / f"step-{step:06d}.png"
    if not write:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".step-{step:06d}.partial.png"
    make_grid(images).save(partial)
    partial.replace(path)
    return path
