"""Training data: read a captioned image dataset, check every image before training, serve same-size batches.

Three layouts are recognised from the path given (``--dataset``):

- a folder of images (png, jpg, jpeg, webp, bmp) with same-name ``.txt`` captions (``cat.png`` +
  ``cat.txt``); subfolders are not read;
- ``metadata.csv`` or ``metadata.jsonl`` in that folder (or the path of such a file, any name) with an
  ``image`` column (paths relative to the metadata file's folder) and a ``prompt`` column;
- Hugging Face imagefolder: ``metadata.jsonl`` with ``file_name`` and a ``text`` or ``caption`` column.

The caption is the ``prompt`` column if there is one, else ``text``, else ``caption``. Every other column is
an extra input of that sample, handed to the pipeline under its own name (``negative_prompt``, a control
image, ...): strings from a CSV, JSON values from a JSONL. A column whose name ends in ``image``
(``control_image``, ``edit_image``) holds image paths: they are made absolute and checked like the main image.

A sample reaches the pipeline as ``{"input_image": PIL image at its target size, "prompt": str, "height": h,
"width": w, **extra}``, the same inputs ``pipe(...)`` takes at inference, so the pipeline's own units turn it
into tensors.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import operator
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from ..errors import DiffusmithError
from ..pipelines.images import load_image, resize_and_crop
from .buckets import BucketBatchSampler, SizeRule

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_COLUMNS = ("image", "file_name")  # first found holds the image path
CAPTION_COLUMNS = ("prompt", "text", "caption")  # first found holds the caption
RESERVED_COLUMNS = ("input_image", "height", "width")  # set by the data layer, so no column may use them
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
MAX_LISTED = 10  # problems named in an error line; the rest are counted (and logged one per line)
_EXAMPLE_ROW = '{"image": "a.png", "prompt": "..."}'
_DROPOUT_STREAM = 0x4350  # keeps the caption-dropout random stream apart from the batch-order one


@dataclass(frozen=True)
class Sample:
    """One checked training example: where its image is, its caption, the size it trains at, extra inputs."""

    name: str  # as the user wrote it (file name or metadata value), for messages
    image: Path
    prompt: str
    height: int
    width: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Record:
    """One row of a dataset as read, before its images are checked."""

    name: str
    image: Path | None
    prompt: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    extra_images: list[tuple[str, Path]] = field(default_factory=list)  # (column, path) to check too
    problem: str | None = None


@dataclass(frozen=True)
class DatasetSummary:
    """What was loaded, for the training log."""

    source: str
    layout: str
    num_samples: int
    num_skipped: int
    repeat: int
    size_rule: str
    buckets: dict[tuple[int, int], int]  # (height, width) -> number of samples (before repeat)

    def __str__(self) -> str:
        text = f"{self.num_samples} samples from {self.source} ({self.layout})"
        if self.num_skipped:
            text += f", {self.num_skipped} unusable skipped"
        if self.repeat > 1:
            text += f"; repeat {self.repeat} -> {self.num_samples * self.repeat} per epoch"
        largest = sorted(self.buckets.items(), key=lambda kv: (-kv[1], kv[0]))
        listed = ", ".join(f"{h}x{w}: {n}" for (h, w), n in largest[:12])
        more = f", +{len(largest) - 12} more" if len(largest) > 12 else ""
        return f"{text}; size {self.size_rule}; {len(self.buckets)} bucket(s) (HxW: samples) {listed}{more}"


# --------------------------------------------------------------------------------------------- reading


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _listing(names: Sequence[str], limit: int = MAX_LISTED) -> str:
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _read_captioned_folder(folder: Path, skip_bad_samples: bool) -> tuple[list[_Record], int]:
    """Records of the captioned images, and how many uncaptioned ones were skipped."""
    images = sorted(p for p in folder.iterdir() if _is_image_file(p))
    if not images:
        raise DiffusmithError(
            f"the dataset is empty: no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)} files, "
            f"not in subfolders, and for {' / '.join(METADATA_NAMES)})")
    records, uncaptioned = [], []
    for image in images:
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            uncaptioned.append(image.name)
            continue
        try:
            prompt = caption_file.read_text(encoding="utf-8-sig").strip()
            records.append(_Record(image.name, image, prompt))
        except UnicodeDecodeError:
            problem = f"caption {caption_file.name} is not UTF-8"
            records.append(_Record(image.name, image, None, problem=problem))
    if uncaptioned:
        message = f"{len(uncaptioned)} of {len(images)} images in {folder} have no caption file: " \
                  f"{_listing(uncaptioned, 5)}"
        if not skip_bad_samples:
            raise DiffusmithError(f"{message}; add a .txt caption next to each image (same name) or use a "
                                  "metadata.csv, or pass --skip-bad-samples to train without them")
        logger.warning("%s; skipping them (--skip-bad-samples)", message)
    if not records:
        raise DiffusmithError(f"the dataset is empty: none of the images in {folder} has a caption file")
    return records, len(uncaptioned)


def _read_csv(file: Path) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    with open(file, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = [c for c in (reader.fieldnames or []) if c]
        # short rows give None, cells beyond the header land under the None key: both read as empty
        rows = [(f"row {n}", {c: row.get(c) or "" for c in columns}) for n, row in enumerate(reader, start=2)]
    return columns, rows


def _read_jsonl(file: Path) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    columns: dict[str, None] = {}  # ordered set: first appearance
    rows = []
    with open(file, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DiffusmithError(f"{file}: line {n} is not valid JSON ({e.msg}); each line must be "
                                      f"one JSON object like {_EXAMPLE_ROW}") from None
            if not isinstance(row, dict):
                raise DiffusmithError(f"{file}: line {n} is not a JSON object; each line must be one "
                                      f"object like {_EXAMPLE_ROW}")
            columns.update(dict.fromkeys(row))
            rows.append((f"line {n}", row))
    return list(columns), rows


def _first_present(candidates: Sequence[str], columns: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def _resolve_images(value: Any, root: Path) -> tuple[Any, list[Path]]:
    """Image paths in an extra column (a path or a list of paths), made absolute; non-paths pass through."""
    if isinstance(value, str) and value:
        path = root / value
        return str(path), [path]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        paths = [root / v for v in value]
        return [str(p) for p in paths], paths
    return value, []


def _read_metadata(file: Path) -> tuple[list[_Record], str, int]:
    try:
        columns, rows = _read_csv(file) if file.suffix.lower() == ".csv" else _read_jsonl(file)
    except UnicodeDecodeError as e:
        raise DiffusmithError(f"{file} is not UTF-8 text ({e.reason}); save it as UTF-8") from None
    if not rows:
        raise DiffusmithError(f"the dataset is empty: {file} has no rows; add one per image")
    found = ", ".join(columns) or "none"
    image_column = _first_present(IMAGE_COLUMNS, columns)
    caption_column = _first_present(CAPTION_COLUMNS, columns)
    if image_column is None:
        raise DiffusmithError(f"{file} has no image column (columns found: {found}); expected 'image' (or "
                              "'file_name') with image paths relative to it, and 'prompt' with the captions")
    if caption_column is None:
        raise DiffusmithError(f"{file} has no caption column (columns found: {found}); expected 'prompt' (or "
                              "'text' or 'caption') with one caption per image")
    clashes = [c for c in columns if c in RESERVED_COLUMNS]
    if clashes:
        raise DiffusmithError(f"{file} has column(s) {', '.join(clashes)}, which the data layer sets itself "
                              "(the resized image and its size); rename or remove them")
    extra_columns = [c for c in columns if c not in (image_column, caption_column)]
    layout = f"{file.name}, Hugging Face imagefolder" if image_column == "file_name" else file.name

    records = []
    root = file.parent
    for where, row in rows:
        image_value, caption = row.get(image_column), row.get(caption_column)
        image_value = image_value.strip() if isinstance(image_value, str) else ""
        if image_value:
            record = _Record(image_value, root / image_value, None)
        else:
            record = _Record(where, None, None, problem=f"no '{image_column}' value")
        if record.problem is None:
            if isinstance(caption, str):
                record.prompt = caption.strip()
            elif isinstance(caption, (int, float)) and not isinstance(caption, bool):
                record.prompt = str(caption)
            else:
                record.problem = f"no '{caption_column}' text"
        for column in extra_columns:
            value = row.get(column)
            if column.endswith("image"):
                value, paths = _resolve_images(value, root)
                record.extra_images += [(column, p) for p in paths]
            record.extra[column] = value
        records.append(record)
    return records, layout, 0


def _read_records(path: Path, skip_bad_samples: bool) -> tuple[list[_Record], str, int]:
    """The dataset's rows, a name for its layout, and how many images were already skipped."""
    if not path.exists():
        raise DiffusmithError(f"dataset not found: {path}; pass a folder of images with .txt captions, or a "
                              "metadata.csv / metadata.jsonl file")
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".jsonl"):
            raise DiffusmithError(f"cannot read dataset {path}: pass a folder of images with .txt captions, "
                                  "or a .csv / .jsonl metadata file")
        return _read_metadata(path)
    present = [path / name for name in METADATA_NAMES if (path / name).is_file()]
    if len(present) > 1:
        raise DiffusmithError(f"{path} has both metadata.jsonl and metadata.csv; pass the path of the one to "
                              "use as --dataset")
    if present:
        return _read_metadata(present[0])
    records, skipped = _read_captioned_folder(path, skip_bad_samples)
    return records, "folder of images + .txt captions", skipped


# --------------------------------------------------------------------------------------------- checking


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def image_problem(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height), None) if PIL can identify the image, else (None, why); pixels are not decoded."""
    if not path.is_file():
        return None, "missing"
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()  # walks the file's structure (PNG checksums, ...) without decoding the pixels
    except UnidentifiedImageError:
        return None, "unreadable: not an image PIL can open"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, f"unreadable: {_short(e)}"
    return size, None


def _display(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _check_records(records: list[_Record], root: Path
                   ) -> tuple[dict[int, tuple[int, int]], list[str], set[int]]:
    """Sizes of the main images, and every problem of every record (so one error can list them all)."""
    jobs = []  # (record index, extra column or None for the main image, path)
    for i, record in enumerate(records):
        if record.problem is None:
            jobs += [(i, None, record.image)] + [(i, column, p) for column, p in record.extra_images]
    if len(jobs) > 1000:
        logger.info("checking %d images", len(jobs))
    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:  # I/O bound
        results = list(pool.map(image_problem, [path for _, _, path in jobs]))
    sizes, problems = {}, []  # problems as (record index, text), listed in the dataset's order
    for i, record in enumerate(records):
        if record.problem is not None:
            problems.append((i, f"{record.name} ({record.problem})"))
    for (i, column, path), (size, problem) in zip(jobs, results, strict=True):
        if problem is not None:
            where = "" if column is None else f", column {column}"
            problems.append((i, f"{_display(path, root)} ({problem}{where})"))
        elif column is None:
            sizes[i] = size
    problems.sort(key=lambda p: p[0])
    return sizes, [text for _, text in problems], {i for i, _ in problems}


# --------------------------------------------------------------------------------------------- dataset


def _check_training_options(caption_dropout: float, repeat: int, seed: int) -> None:
    if not isinstance(caption_dropout, (int, float)) or not 0.0 <= caption_dropout < 1.0:
        raise DiffusmithError(f"caption dropout must be in [0, 1) (the fraction of captions replaced by an "
                              f"empty prompt), got {caption_dropout!r}")
    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
        raise DiffusmithError(f"repeat must be a positive integer (times each image is seen per epoch), "
                              f"got {repeat!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DiffusmithError(f"seed must be an integer, got {seed!r}")


class TrainingDataset(Dataset):
    """Checked samples served as pipeline inputs; an epoch holds every sample ``repeat`` times.

    Index ``i`` is copy ``i // len(samples)`` of sample ``i % len(samples)``. Items may be indexed by ``i``
    (caption dropout then uses ``self.epoch``, see ``set_epoch``) or by ``(epoch, i)``, which is what the
    loader from ``make_dataloader`` passes, so that worker processes need no epoch of their own.
    """

    def __init__(self, samples: Sequence[Sample], *, caption_dropout: float = 0.0, repeat: int = 1,
                 seed: int = 0, summary: DatasetSummary | None = None):
        _check_training_options(caption_dropout, repeat, seed)
        self.samples = list(samples)
        self.caption_dropout, self.repeat, self.seed = float(caption_dropout), repeat, seed
        self.epoch = 0
        self.summary = summary or DatasetSummary(
            source="samples", layout="in memory", num_samples=len(self.samples), num_skipped=0, repeat=repeat,
            size_rule="per sample", buckets=dict(Counter((s.height, s.width) for s in self.samples)))

    def __len__(self) -> int:
        return len(self.samples) * self.repeat

    @property
    def bucket_of_each_sample(self) -> list[tuple[int, int]]:
        """(height, width) of every index, the input of ``BucketBatchSampler``."""
        sizes = [(s.height, s.width) for s in self.samples]
        return sizes * self.repeat

    def set_epoch(self, epoch: int) -> None:
        """The epoch used for caption dropout when items are indexed by a plain integer."""
        self.epoch = epoch

    def caption_dropped(self, index: int, epoch: int) -> bool:
        """Whether item ``index`` trains with an empty prompt in ``epoch``: a pure function of (seed, epoch,
        index), so a resumed run drops the same captions."""
        if self.caption_dropout == 0.0:
            return False
        draw = np.random.default_rng([_DROPOUT_STREAM, self.seed % 2**64, epoch, index]).random()
        return bool(draw < self.caption_dropout)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        sample = self.samples[index % len(self.samples)]
        image = load_image(sample.image)
        if image.size != (sample.width, sample.height):
            image = resize_and_crop(image, sample.height, sample.width)
        prompt = "" if self.caption_dropped(index, epoch) else sample.prompt
        return {"input_image": image, "prompt": prompt, "height": sample.height, "width": sample.width,
                **copy.deepcopy(sample.extra)}

    def describe(self) -> str:
        """One line for the training log: samples, skipped, repeat, sizing and buckets."""
        return str(self.summary)


def load_dataset(path: str | Path, *, height: int | None = None, width: int | None = None,
                 max_pixels: int | None = None, caption_dropout: float = 0.0, repeat: int = 1,
                 skip_bad_samples: bool = False, seed: int = 0) -> TrainingDataset:
    """Read a dataset (layout detected from ``path``), check every image, and size each sample.

    Give either ``height`` and ``width`` (every image resized to cover that size, then centre-cropped) or
    ``max_pixels`` (each image keeps its aspect ratio, scaled up or down to the budget; see
    ``buckets.size_within_budget``). Unusable samples (missing or unreadable images, no caption) are all
    reported in one error, or dropped with a warning when ``skip_bad_samples`` is set.
    """
    size_rule = SizeRule.from_options(height, width, max_pixels)
    _check_training_options(caption_dropout, repeat, seed)
    path = Path(path)
    records, layout, skipped = _read_records(path, skip_bad_samples)
    root = path if path.is_dir() else path.parent
    sizes, problems, bad = _check_records(records, root)
    if problems:
        message = f"{len(bad)} of {len(records)} samples cannot be used: {_listing(problems)}"
        if len(problems) > MAX_LISTED:
            for problem in problems:
                logger.warning("unusable sample: %s", problem)
        if not skip_bad_samples:
            raise DiffusmithError(f"{message}; fix them or pass --skip-bad-samples")
        logger.warning("skipping %d of %d samples that cannot be used (--skip-bad-samples)", len(bad),
                       len(records))
    samples = []
    for i, record in enumerate(records):
        if i in bad:
            continue
        image_width, image_height = sizes[i]
        h, w = size_rule.target(image_height, image_width)
        samples.append(Sample(record.name, record.image, record.prompt, h, w, record.extra))
    if not samples:
        raise DiffusmithError(f"the dataset is empty: none of the {len(records)} samples in {path} is usable")
    summary = DatasetSummary(source=str(path), layout=layout, num_samples=len(samples),
                             num_skipped=skipped + len(bad), repeat=repeat, size_rule=str(size_rule),
                             buckets=dict(Counter((s.height, s.width) for s in samples)))
    return TrainingDataset(samples, caption_dropout=caption_dropout, repeat=repeat, seed=seed,
                           summary=summary)


# --------------------------------------------------------------------------------------------- batching


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """A batch as one list per key (PIL images stay PIL; the pipeline's units make the tensors)."""
    keys = dict.fromkeys(k for sample in samples for k in sample)
    return {k: [sample.get(k) for sample in samples] for k in keys}


class _EpochTaggedBatchSampler(BucketBatchSampler):
    """Yields ``(epoch, index)`` pairs so that dataset copies in worker processes know the epoch."""

    def __iter__(self):
        epoch = self.epoch
        for batch in super().__iter__():
            yield [(epoch, i) for i in batch]


def make_dataloader(dataset: TrainingDataset, batch_size: int, seed: int, num_workers: int = 0,
                    epoch: int = 0, num_replicas: int = 1, rank: int = 0) -> DataLoader:
    """A DataLoader of same-size batches (dicts of lists, see ``collate_samples``) in a (seed, epoch) order.

    ``loader.batch_sampler`` is the ``BucketBatchSampler``: call its ``set_epoch`` before each epoch, and save
    its ``state_dict`` to resume. With ``num_workers > 0`` the loader asks for batches ahead of the training
    loop, so save ``state_dict(batches_done=<batches the loop consumed this epoch>)``.
    """
    if not isinstance(num_workers, int) or num_workers < 0:
        raise DiffusmithError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    sampler = _EpochTaggedBatchSampler(dataset.bucket_of_each_sample, batch_size, seed,
                                       num_replicas=num_replicas, rank=rank)
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    workers = {"persistent_workers": True, "prefetch_factor": 2} if num_workers > 0 else {}
    # an own generator: creating the loader's iterator must not draw from the global RNG (exact resume)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples, num_workers=num_workers,
                      generator=generator, **workers)


__all__ = ["DatasetSummary", "Sample", "TrainingDataset", "collate_samples", "image_problem", "load_dataset",
           "make_dataloader"]
