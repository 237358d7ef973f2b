"""Which size each training image is trained at, and batches that never mix sizes.

A batch becomes one tensor, so all of its images must share (height, width). With a fixed size every image
is resized to cover it and centre-cropped. With a pixel budget each image keeps (about) its own aspect
ratio; images that end up with the same size form a bucket, and every batch is drawn from one bucket.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from ..errors import DiffusmithError

SIZE_MULTIPLE = 16  # one DiT token covers 16x16 pixels (8x VAE downsampling, then 2x2 patches)
MIN_SIDE, MAX_SIDE = 16, 16384
_SHUFFLE_STREAM = 0x5348  # keeps the batch-order random stream apart from the caption-dropout one


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SizeRule:
    """Either a fixed (height, width) for every image, or a pixel budget that keeps each aspect ratio."""

    height: int | None = None
    width: int | None = None
    max_pixels: int | None = None

    @classmethod
    def from_options(cls, height: int | None = None, width: int | None = None,
                     max_pixels: int | None = None) -> SizeRule:
        """Check the user's sizing options (--height/--width or --max-pixels) and build the rule."""
        fixed = height is not None or width is not None
        if fixed and max_pixels is not None:
            raise DiffusmithError("pass either a fixed size (--height and --width) or --max-pixels, not both")
        if max_pixels is not None:
            if not _is_int(max_pixels) or max_pixels < MIN_SIDE * MIN_SIDE:
                raise DiffusmithError(f"max_pixels must be an integer of at least {MIN_SIDE * MIN_SIDE} "
                                      f"(16x16), got {max_pixels!r}; e.g. --max-pixels {1024 * 1024}")
            return cls(max_pixels=max_pixels)
        if not fixed:
            raise DiffusmithError("no training size given: pass --height and --width (every image cropped to "
                                  "that size) or --max-pixels (each image keeps its aspect ratio)")
        if height is None or width is None:
            raise DiffusmithError("pass both --height and --width for a fixed training size "
                                  "(or --max-pixels to keep each image's aspect ratio)")
        for name, value in (("height", height), ("width", width)):
            if not _is_int(value) or not MIN_SIDE <= value <= MAX_SIDE or value % SIZE_MULTIPLE:
                raise DiffusmithError(f"{name} must be a multiple of {SIZE_MULTIPLE} between {MIN_SIDE} and "
                                      f"{MAX_SIDE} pixels, got {value!r}")
        return cls(height=height, width=width)

    def target(self, image_height: int, image_width: int) -> tuple[int, int]:
        """(height, width) an image of this size is trained at."""
        if self.max_pixels is None:
            return self.height, self.width
        return size_within_budget(image_height, image_width, self.max_pixels)

    def __str__(self) -> str:
        if self.max_pixels is None:
            return f"fixed {self.height}x{self.width} (HxW)"
        return f"at most {self.max_pixels} pixels, aspect ratio kept"


def size_within_budget(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """The largest (h, w), both multiples of 16, with about the image's aspect ratio and h * w <= max_pixels.

    The image is scaled to the budget whether it is larger or smaller: small images are upscaled, so that
    every sample of a run costs about the same and the model sees one resolution. Flooring to multiples of
    16 changes the aspect ratio slightly; the few extra pixels are centre-cropped when the image is loaded.
    """
    scale = math.sqrt(max_pixels / (height * width))
    # the epsilon keeps an exact fit (e.g. 512x512 in a 512*512 budget) from flooring one multiple too low
    h = max(MIN_SIDE, math.floor(height * scale / SIZE_MULTIPLE + 1e-9) * SIZE_MULTIPLE)
    w = max(MIN_SIDE, math.floor(width * scale / SIZE_MULTIPLE + 1e-9) * SIZE_MULTIPLE)
    # a very thin image has one side raised to the 16-pixel minimum: shorten the other to stay in budget
    while h * w > max_pixels and max(h, w) > MIN_SIDE:
        if w >= h:
            w -= SIZE_MULTIPLE
        else:
            h -= SIZE_MULTIPLE
    return min(h, MAX_SIDE), min(w, MAX_SIDE)


class BucketBatchSampler(Sampler):
    """Batches of sample indices, each batch from one bucket, in a shuffled order fixed by (seed, epoch).

    Every epoch, each bucket's indices are shuffled and cut into batches of ``batch_size``; the last batch
    of a bucket may be smaller and is kept (``drop_last=False``), so every sample is seen every epoch. Then
    the batches of all buckets are shuffled together.

    Resuming: ``state_dict()`` holds the epoch and how many of its batches were yielded; a sampler given it
    through ``load_state_dict`` continues with exactly the next batch. Call ``set_epoch`` before each epoch.
    """

    def __init__(self, bucket_of_each_sample: Sequence[Hashable], batch_size: int, seed: int = 0,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        super().__init__()
        if not 0 <= rank < num_replicas:
            raise DiffusmithError(f"rank {rank} is outside 0..{num_replicas - 1}")
        # data-parallel: every process gets every num_replicas-th batch of the same epoch order
        self.num_replicas, self.rank = num_replicas, rank
        if not _is_int(batch_size) or batch_size < 1:
            raise DiffusmithError(f"batch size must be a positive integer, got {batch_size!r}")
        if not _is_int(seed):
            raise DiffusmithError(f"seed must be an integer, got {seed!r}")
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.num_samples = len(bucket_of_each_sample)
        self.buckets: dict[Hashable, list[int]] = {}  # in order of first appearance, for determinism
        for index, bucket in enumerate(bucket_of_each_sample):
            self.buckets.setdefault(bucket, []).append(index)
        # a changed dataset (other images, sizes or order) must not silently resume with a different order
        self._layout = hashlib.sha1(repr(list(bucket_of_each_sample)).encode()).hexdigest()[:16]
        self.epoch = 0
        self._resume_at = 0  # batches of self.epoch to skip on the next iteration (set by load_state_dict)
        self._yielded = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batch order the next iteration yields (a resumed position is kept)."""
        if epoch != self.epoch:
            self.epoch, self._resume_at, self._yielded = epoch, 0, 0

    def batches_of_epoch(self, epoch: int) -> list[list[int]]:
        """All batches of one epoch, in order (a pure function of seed, epoch and the buckets)."""
        rng = np.random.default_rng([_SHUFFLE_STREAM, self.seed % 2**64, epoch])
        batches = []
        for indices in self.buckets.values():
            shuffled = [indices[k] for k in rng.permutation(len(indices))]
            for start in range(0, len(shuffled), self.batch_size):
                batch = shuffled[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        return [batches[k] for k in rng.permutation(len(batches))]

    def batches_of_this_process(self, epoch: int) -> list[list[int]]:
        """This process's share of an epoch; the tail that cannot be shared evenly is left out so that every
        process runs the same number of steps (uneven counts would hang data-parallel training)."""
        batches = self.batches_of_epoch(epoch)
        if self.num_replicas == 1:
            return batches
        usable = len(batches) // self.num_replicas * self.num_replicas
        return batches[:usable][self.rank::self.num_replicas]

    def __len__(self) -> int:
        """Batches of a whole epoch for this process (a resumed epoch yields fewer)."""
        rounding = math.floor if self.drop_last else math.ceil
        total = sum(rounding(len(indices) / self.batch_size) for indices in self.buckets.values())
        return total // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches_of_this_process(self.epoch)
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        for batch in batches[start:]:
            self._yielded += 1
            yield batch

    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        """Where this epoch stands. ``batches_done`` overrides the count of batches handed out, for loaders
        with workers, which ask for batches ahead of the training loop."""
        return {"epoch": self.epoch, "batches_done": self._yielded if batches_done is None else batches_done,
                "seed": self.seed, "batch_size": self.batch_size, "drop_last": self.drop_last,
                "num_samples": self.num_samples, "layout": self._layout, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: the next iteration starts with the batch after the last done."""
        identity = ("seed", "batch_size", "drop_last", "num_samples", "layout", "num_replicas")
        state = {"num_replicas": 1, **state}
        current = self.state_dict()
        if any(state[k] != current[k] for k in identity):
            raise DiffusmithError(
                f"cannot resume the data order: the checkpoint was made with seed {state['seed']}, batch "
                f"size {state['batch_size']} and {state['num_samples']} samples, this run has seed "
                f"{self.seed}, batch size {self.batch_size} and {self.num_samples} samples (or the images or "
                "their sizes changed); use the same dataset and options to resume")
        self.epoch = state["epoch"]
        self._resume_at = self._yielded = state["batches_done"]
