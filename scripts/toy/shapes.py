"""Procedural captioned pictures of coloured shapes: the toy model's whole world.

Each picture is 64x64 (8x8 latents, 16 DiT tokens): one or two shapes (circle, square, triangle) of a named
colour on a plain background of another named colour, captioned the way a user would prompt:

    a red circle on a blue background, top left, small
    a yellow triangle left of a white square on a black background

Everything is drawn from ``random.Random(seed)``, so a seed names a dataset. The colour ``purple`` is held
out: the toy never sees it in training, and the demo teaches it with a LoRA (``--concept``).

    python scripts/toy/shapes.py --out data/shapes --count 3000 --seed 0
    python scripts/toy/shapes.py --out demo/concept --count 12 --seed 2 --concept --reminders 12
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # shapes are drawn 4x larger and downscaled, for smooth edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
HELD_OUT_COLOURS: dict[str, tuple[int, int, int]] = {"purple": (140, 50, 200)}
SHAPES = ("circle", "square", "triangle")

# single-object positions: name -> centre in pixels of the 64x64 picture
POSITIONS: dict[str, tuple[int, int]] = {
    "center": (32, 32),
    "left": (16, 32),
    "right": (48, 32),
    "top": (32, 16),
    "bottom": (32, 48),
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
}
SIZES = {"small": 14, "large": 28}  # the shape's bounding-box side in pixels
PAIR_SIZE = 22
# two-object scenes: relation -> (first object's centre, second object's centre)
RELATIONS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "left of": ((16, 32), (48, 32)),
    "above": ((32, 16), (32, 48)),
}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    centre: tuple[int, int]
    size: int


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]
    caption: str


def rgb(name: str) -> tuple[int, int, int]:
    return COLOURS.get(name) or HELD_OUT_COLOURS[name]


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, centre: tuple[int, int], size: int,
               fill: tuple[int, int, int]) -> None:
    """One shape on a SUPERSAMPLE-times larger canvas; ``centre`` and ``size`` are in final pixels."""
    s = SUPERSAMPLE
    cx, cy, half = centre[0] * s, centre[1] * s, size * s / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}: use one of {', '.join(SHAPES)}")


def render(background: tuple[int, int, int], shapes: list[tuple[str, tuple[int, int], int, tuple[int, int, int]]]
           ) -> Image.Image:
    """A 64x64 RGB picture: ``shapes`` is a list of (kind, centre, size, rgb) drawn in order."""
    big = Image.new("RGB", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), background)
    draw = ImageDraw.Draw(big)
    for kind, centre, size, fill in shapes:
        draw_shape(draw, kind, centre, size, fill)
    return big.resize((SIZE, SIZE), Image.BOX)


def render_scene(scene: Scene) -> Image.Image:
    return render(rgb(scene.background), [(s.kind, s.centre, s.size, rgb(s.colour)) for s in scene.shapes])


def _jitter(rng: random.Random, centre: tuple[int, int], amount: int = 2) -> tuple[int, int]:
    return centre[0] + rng.randint(-amount, amount), centre[1] + rng.randint(-amount, amount)


def single_scene(rng: random.Random, colours: list[str], backgrounds: list[str]) -> Scene:
    colour = rng.choice(colours)
    background = rng.choice([b for b in backgrounds if b != colour])
    kind, position, size = rng.choice(SHAPES), rng.choice(list(POSITIONS)), rng.choice(list(SIZES))
    shape = Shape(kind, colour, _jitter(rng, POSITIONS[position]), SIZES[size] + rng.randint(-1, 1))
    return Scene(background, (shape,), f"a {colour} {kind} on a {background} background, {position}, {size}")


def pair_scene(rng: random.Random, colours: list[str], backgrounds: list[str]) -> Scene:
    first, second = rng.sample(colours, 2)
    background = rng.choice([b for b in backgrounds if b not in (first, second)])
    kinds = rng.choice(SHAPES), rng.choice(SHAPES)
    relation = rng.choice(list(RELATIONS))
    centres = RELATIONS[relation]
    shapes = tuple(Shape(k, c, _jitter(rng, p), PAIR_SIZE + rng.randint(-1, 1))
                   for k, c, p in zip(kinds, (first, second), centres, strict=True))
    caption = f"a {first} {kinds[0]} {relation} a {second} {kinds[1]} on a {background} background"
    return Scene(background, shapes, caption)


def make_scenes(count: int, seed: int, concept: bool = False, pair_fraction: float = 0.3) -> list[Scene]:
    """``count`` scenes from ``seed``. Without ``concept`` only the training colours appear; with it every
    scene has a purple object (backgrounds stay training colours)."""
    rng = random.Random(seed)
    named = list(COLOURS)
    scenes = []
    for _ in range(count):
        if concept:
            scene = single_scene(rng, list(HELD_OUT_COLOURS), named)
        elif rng.random() < pair_fraction:
            scene = pair_scene(rng, named, named)
        else:
            scene = single_scene(rng, named, named)
        scenes.append(scene)
    return scenes


def random_colour_picture(rng: random.Random) -> Image.Image:
    """An uncaptioned picture with arbitrary RGB colours (any hue, purple included): what the toy VAE learns
    to reconstruct, so it can draw colours the DiT was never told about (a real VAE sees every colour too)."""
    def colour() -> tuple[int, int, int]:
        return rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)

    shapes = [(rng.choice(SHAPES), (rng.randint(6, 58), rng.randint(6, 58)), rng.randint(8, 34), colour())
              for _ in range(rng.randint(1, 3))]
    return render(colour(), shapes)


def write_dataset(out: str | Path, count: int, seed: int, concept: bool = False, reminders: int = 0) -> list[Scene]:
    """``NNNN.png`` + ``NNNN.txt`` per scene, the folder format ``diffusmith train --dataset`` reads.

    ``reminders`` adds that many ordinary single-shape scenes after the concept ones: pictures of what the model
    already knows, so that a LoRA learns the new colour without drifting the old ones toward it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scenes = make_scenes(count, seed, concept=concept)
    rng = random.Random(seed + 1)
    named = list(COLOURS)
    # colours in turn (red first: without reminders it drifts toward purple most), backgrounds varied too
    scenes += [single_scene(rng, [named[i % len(named)]], [named[(i + 3) % len(named)]]) for i in range(reminders)]
    count = len(scenes)
    digits = max(4, len(str(count - 1)))
    for i, scene in enumerate(scenes):
        render_scene(scene).save(out / f"{i:0{digits}d}.png", optimize=True)
        (out / f"{i:0{digits}d}.txt").write_text(scene.caption + "\n")
    return scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write NNNN.png + NNNN.txt into")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concept", action="store_true", help="only scenes with the held-out colour (purple)")
    parser.add_argument("--reminders", type=int, default=0, help="ordinary scenes added after the others")
    args = parser.parse_args()
    scenes = write_dataset(args.out, args.count, args.seed, concept=args.concept, reminders=args.reminders)
    print(f"wrote {len(scenes)} pictures with captions to {args.out}")


if __name__ == "__main__":
    main()
