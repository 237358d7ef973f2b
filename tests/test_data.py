"""Training data: dataset layouts, up-front image checks, sizing, buckets, resume, caption dropout."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from diffusmith.errors import DiffusmithError
from diffusmith.training.buckets import BucketBatchSampler, SizeRule, size_within_budget
from diffusmith.training.data import (
    Sample,
    TrainingDataset,
    collate_samples,
    image_problem,
    load_dataset,
    make_dataloader,
)


def make_image(path: Path, width: int, height: int, color=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)
    return path


def captioned(folder: Path, name: str, width: int, height: int, caption: str) -> Path:
    image = make_image(folder / name, width, height)
    image.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return image


def write_csv(file: Path, rows: list[dict]) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return file


def write_jsonl(file: Path, rows: list[dict]) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return file


def mixed_folder(folder: Path, per_shape: dict[tuple[int, int], int]) -> Path:
    """Captioned images, ``per_shape[(w, h)]`` of each size."""
    k = 0
    for (w, h), count in per_shape.items():
        for _ in range(count):
            captioned(folder, f"img{k:03d}.png", w, h, f"caption {k}")
            k += 1
    return folder


# ------------------------------------------------------------------------------------------- layouts


def test_captioned_folder(tmp_path):
    captioned(tmp_path, "a.png", 40, 40, "  a red square \n")
    captioned(tmp_path, "b.JPG", 40, 40, "second")
    captioned(tmp_path, "c.webp", 40, 40, "third")
    captioned(tmp_path, "sub/d.png", 40, 40, "in a subfolder: not read")
    (tmp_path / "notes.md").write_text("not an image")
    data = load_dataset(tmp_path, height=32, width=48)
    assert len(data) == 3
    assert [s.name for s in data.samples] == ["a.png", "b.JPG", "c.webp"]
    item = data[0]
    assert set(item) == {"input_image", "prompt", "height", "width"}
    assert item["prompt"] == "a red square"
    assert isinstance(item["input_image"], Image.Image) and item["input_image"].size == (48, 32)
    assert (item["height"], item["width"]) == (32, 48)


def test_metadata_csv_extra_columns_pass_through(tmp_path):
    make_image(tmp_path / "imgs" / "a.png", 64, 64)
    make_image(tmp_path / "imgs" / "b.png", 64, 64)
    make_image(tmp_path / "control" / "a.png", 64, 64)
    make_image(tmp_path / "control" / "b.png", 64, 64)
    write_csv(tmp_path / "metadata.csv", [
        {"image": "imgs/a.png", "prompt": "a cat, sitting", "negative_prompt": "blurry",
         "control_image": "control/a.png"},
        {"image": "imgs/b.png", "prompt": "a dog", "negative_prompt": "", "control_image": "control/b.png"},
    ])
    data = load_dataset(tmp_path, max_pixels=32 * 32)
    first, second = data[0], data[1]
    assert first["prompt"] == "a cat, sitting" and first["negative_prompt"] == "blurry"
    assert second["negative_prompt"] == ""
    # image-path columns are resolved against the metadata file's folder and stay strings
    assert first["control_image"] == str(tmp_path / "control" / "a.png")
    assert Path(second["control_image"]).is_file()
    # the metadata file itself can be the dataset path
    assert len(load_dataset(tmp_path / "metadata.csv", max_pixels=32 * 32)) == 2


def test_metadata_jsonl_keeps_json_values(tmp_path):
    make_image(tmp_path / "a.png", 32, 32)
    make_image(tmp_path / "b.png", 32, 32)
    write_jsonl(tmp_path / "train.jsonl", [
        {"image": "a.png", "prompt": "one", "weight": 0.5, "tags": ["x", "y"]},
        {"image": "b.png", "prompt": "two"},
    ])
    data = load_dataset(tmp_path / "train.jsonl", height=32, width=32)
    assert data[0]["weight"] == 0.5 and data[0]["tags"] == ["x", "y"]
    assert data[1]["weight"] is None and data[1]["tags"] is None  # every sample has every column
    data[0]["tags"].append("z")
    assert data[0]["tags"] == ["x", "y"]  # callers get copies


@pytest.mark.parametrize("caption_column", ["text", "caption"])
def test_huggingface_imagefolder(tmp_path, caption_column):
    make_image(tmp_path / "train" / "0001.png", 32, 32)
    make_image(tmp_path / "train" / "0002.jpg", 32, 32)
    write_jsonl(tmp_path / "train" / "metadata.jsonl", [
        {"file_name": "0001.png", caption_column: "first"},
        {"file_name": "0002.jpg", caption_column: "second"},
    ])
    data = load_dataset(tmp_path / "train", height=16, width=16)
    assert [data[i]["prompt"] for i in range(2)] == ["first", "second"]
    assert "imagefolder" in data.describe()


def test_prompt_column_wins_over_text(tmp_path):
    make_image(tmp_path / "a.png", 32, 32)
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": "from text", "prompt": "ours"}])
    item = load_dataset(tmp_path, height=16, width=16)[0]
    assert item["prompt"] == "ours" and item["text"] == "from text"


# ------------------------------------------------------------------------------------------- errors


def test_missing_caption_file(tmp_path, caplog):
    captioned(tmp_path, "a.png", 32, 32, "ok")
    make_image(tmp_path / "b.png", 32, 32)
    make_image(tmp_path / "c.png", 32, 32)
    with pytest.raises(DiffusmithError) as e:
        load_dataset(tmp_path, height=16, width=16)
    message = str(e.value)
    assert "2 of 3 images" in message and "b.png" in message and "c.png" in message
    assert "add a .txt caption" in message and "metadata.csv" in message and "\n" not in message
    with caplog.at_level(logging.WARNING):
        data = load_dataset(tmp_path, height=16, width=16, skip_bad_samples=True)
    assert len(data) == 1 and "b.png" in caplog.text
    assert data.summary.num_skipped == 2


def test_missing_caption_column(tmp_path):
    make_image(tmp_path / "a.png", 32, 32)
    write_jsonl(tmp_path / "metadata.jsonl", [{"image": "a.png", "description": "no caption column"}])
    with pytest.raises(DiffusmithError, match=r"no caption column \(columns found: image, description\)"):
        load_dataset(tmp_path, height=16, width=16)


def test_missing_image_column(tmp_path):
    write_csv(tmp_path / "metadata.csv", [{"path": "a.png", "prompt": "x"}])
    with pytest.raises(DiffusmithError, match="no image column .*found: path, prompt"):
        load_dataset(tmp_path, height=16, width=16)


def test_empty_datasets(tmp_path):
    with pytest.raises(DiffusmithError, match=f"empty: no images in {tmp_path}"):
        load_dataset(tmp_path, height=16, width=16)
    (tmp_path / "metadata.csv").write_text("image,prompt\n", encoding="utf-8")
    with pytest.raises(DiffusmithError, match="empty: .*metadata.csv has no rows"):
        load_dataset(tmp_path, height=16, width=16)


def test_unreadable_dataset_paths(tmp_path):
    with pytest.raises(DiffusmithError, match="dataset not found"):
        load_dataset(tmp_path / "nope", height=16, width=16)
    (tmp_path / "metadata.csv").write_text("image,prompt\na.png,x\n", encoding="utf-8")
    (tmp_path / "metadata.jsonl").write_text('{"image": "a.png", "prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(DiffusmithError, match="both metadata.jsonl and metadata.csv"):
        load_dataset(tmp_path, height=16, width=16)
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DiffusmithError, match="line 2 is not valid JSON"):
        load_dataset(tmp_path / "bad.jsonl", height=16, width=16)


def corrupt_dataset(folder: Path) -> Path:
    make_image(folder / "good1.png", 32, 32)
    make_image(folder / "good2.png", 32, 32)
    (folder / "garbage.png").write_bytes(b"this is not a png at all")
    truncated = make_image(folder / "full.png", 64, 64).read_bytes()
    (folder / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    return write_csv(folder / "metadata.csv", [
        {"image": "good1.png", "prompt": "a"},
        {"image": "missing.png", "prompt": "b"},
        {"image": "garbage.png", "prompt": "c"},
        {"image": "good2.png", "prompt": "d"},
        {"image": "truncated.png", "prompt": "e"},
        {"image": "", "prompt": "f"},
    ])


def test_all_bad_images_reported_in_one_line(tmp_path):
    corrupt_dataset(tmp_path)
    with pytest.raises(DiffusmithError) as e:
        load_dataset(tmp_path, height=16, width=16)
    message = str(e.value)
    assert message.startswith("4 of 6 samples cannot be used")
    assert "missing.png (missing)" in message
    assert "garbage.png (unreadable" in message and "truncated.png (unreadable" in message
    assert "row 7 (no 'image' value)" in message
    assert message.index("missing.png") < message.index("garbage.png") < message.index("row 7")  # row order
    assert "good1.png" not in message and message.endswith("fix them or pass --skip-bad-samples")
    assert "\n" not in message


def test_skip_bad_samples(tmp_path, caplog):
    corrupt_dataset(tmp_path)
    with caplog.at_level(logging.WARNING):
        data = load_dataset(tmp_path, height=16, width=16, skip_bad_samples=True)
    assert [s.name for s in data.samples] == ["good1.png", "good2.png"]
    assert "skipping 4 of 6 samples" in caplog.text
    assert data.summary.num_skipped == 4 and "4 unusable skipped" in data.describe()


def test_everything_skipped_is_empty(tmp_path):
    write_csv(tmp_path / "metadata.csv", [{"image": "gone.png", "prompt": "x"}])
    with pytest.raises(DiffusmithError, match="empty: none of the 1 samples"):
        load_dataset(tmp_path, height=16, width=16, skip_bad_samples=True)


def test_bad_extra_image_is_reported(tmp_path):
    make_image(tmp_path / "a.png", 32, 32)
    write_csv(tmp_path / "metadata.csv", [{"image": "a.png", "prompt": "x", "control_image": "ctrl.png"}])
    with pytest.raises(DiffusmithError, match=r"ctrl.png \(missing, column control_image\)"):
        load_dataset(tmp_path, height=16, width=16)


def test_image_problem_reads_header_only(tmp_path):
    assert image_problem(make_image(tmp_path / "a.png", 30, 20)) == ((30, 20), None)
    assert image_problem(tmp_path / "none.png") == (None, "missing")


@pytest.mark.parametrize("kwargs, match", [
    ({}, "no training size given"),
    ({"height": 64}, "pass both --height and --width"),
    ({"height": 64, "width": 64, "max_pixels": 4096}, "not both"),
    ({"height": 64, "width": 70}, "width must be a multiple of 16"),
    ({"max_pixels": 100}, "max_pixels must be an integer of at least 256"),
    ({"height": 64, "width": 64, "caption_dropout": 1.0}, r"caption dropout must be in \[0, 1\)"),
    ({"height": 64, "width": 64, "caption_dropout": -0.1}, "caption dropout"),
    ({"height": 64, "width": 64, "repeat": 0}, "repeat must be a positive integer"),
])
def test_argument_checks(tmp_path, kwargs, match):
    captioned(tmp_path, "a.png", 32, 32, "x")
    with pytest.raises(DiffusmithError, match=match):
        load_dataset(tmp_path, **kwargs)


# ------------------------------------------------------------------------------------------- sizing


def test_fixed_size_covers_and_crops(tmp_path):
    captioned(tmp_path, "wide.png", 300, 200, "wide")
    captioned(tmp_path, "tall.png", 100, 400, "tall")
    data = load_dataset(tmp_path, height=64, width=96)
    assert data.bucket_of_each_sample == [(64, 96), (64, 96)]
    assert all(data[i]["input_image"].size == (96, 64) for i in range(2))


def test_max_pixels_sizes():
    # 300x200 (W x H) in 65536 px: scale sqrt(65536 / 60000) = 1.04512;
    # height 200 -> 209.02 -> 208, width 300 -> 313.54 -> 304
    assert size_within_budget(200, 300, 256 * 256) == (208, 304)
    # small images are scaled up to the budget: 30x20 lands where 300x200 does
    assert size_within_budget(20, 30, 256 * 256) == (208, 304)
    # an exact fit stays exact
    assert size_within_budget(512, 512, 512 * 512) == (512, 512)
    # 64x32 in 4096 px: scale sqrt(2) -> 45.25 x 90.51 -> 32 x 80
    assert size_within_budget(32, 64, 64 * 64) == (32, 80)
    # 1000x10 in 4096 px: height rises to the 16 px minimum, width shrinks to keep 16 * w <= 4096
    assert size_within_budget(10, 1000, 64 * 64) == (16, 256)
    assert SizeRule.from_options(max_pixels=256 * 256).target(200, 300) == (208, 304)


def test_max_pixels_dataset_sizes(tmp_path):
    captioned(tmp_path, "a.png", 300, 200, "landscape")
    captioned(tmp_path, "b.png", 200, 300, "portrait")
    data = load_dataset(tmp_path, max_pixels=256 * 256)
    assert data.bucket_of_each_sample == [(208, 304), (304, 208)]
    assert data[0]["input_image"].size == (304, 208) and data[1]["input_image"].size == (208, 304)
    assert "2 bucket(s)" in data.describe() and "208x304: 1" in data.describe()


# ------------------------------------------------------------------------------------------- batching


def test_buckets_never_mix_sizes(tmp_path):
    mixed_folder(tmp_path, {(64, 32): 5, (32, 64): 3, (48, 48): 4})
    data = load_dataset(tmp_path, max_pixels=48 * 48)
    assert len(set(data.bucket_of_each_sample)) == 3
    loader = make_dataloader(data, batch_size=2, seed=1)
    seen = []
    for batch in loader:
        sizes = {(h, w) for h, w in zip(batch["height"], batch["width"], strict=True)}
        assert len(sizes) == 1
        (h, w), = sizes
        assert all(image.size == (w, h) for image in batch["input_image"])
        seen += batch["prompt"]
    assert sorted(seen) == sorted(f"caption {k}" for k in range(12))  # small last batches kept
    assert len(loader) == 3 + 2 + 2


def test_sampler_order_depends_on_seed_and_epoch():
    buckets = ["a"] * 7 + ["b"] * 5 + ["c"] * 3
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=0)
    epoch0 = list(sampler)
    assert epoch0 == list(BucketBatchSampler(buckets, batch_size=2, seed=0))
    assert epoch0 != list(BucketBatchSampler(buckets, batch_size=2, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    assert len(epoch0) == len(sampler) == 4 + 3 + 2
    assert sorted(i for batch in epoch0 for i in batch) == list(range(15))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in epoch0)
    assert len(BucketBatchSampler(buckets, batch_size=2, drop_last=True)) == 3 + 2 + 1


def test_sampler_resume_continues_with_next_batch():
    buckets = ["a"] * 7 + ["b"] * 5 + ["c"] * 3
    reference = BucketBatchSampler(buckets, batch_size=2, seed=5)
    reference.set_epoch(3)
    uninterrupted = list(reference)

    interrupted = BucketBatchSampler(buckets, batch_size=2, seed=5)
    interrupted.set_epoch(3)
    batches = iter(interrupted)
    first = [next(batches) for _ in range(4)]
    state = interrupted.state_dict()
    assert state["epoch"] == 3 and state["batches_done"] == 4

    resumed = BucketBatchSampler(buckets, batch_size=2, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the usual call before an epoch keeps the resumed position
    rest = list(resumed)
    assert first + rest == uninterrupted and len(rest) == len(uninterrupted) - 4
    assert resumed.state_dict()["batches_done"] == len(uninterrupted)
    resumed.set_epoch(4)
    assert len(list(resumed)) == len(resumed)  # the next epoch is whole again

    with pytest.raises(DiffusmithError, match="cannot resume"):
        BucketBatchSampler(buckets, batch_size=3, seed=5).load_state_dict(state)
    with pytest.raises(DiffusmithError, match="cannot resume"):
        BucketBatchSampler(["a"] * 8 + ["b"] * 4 + ["c"] * 3, batch_size=2, seed=5).load_state_dict(state)


def test_loader_resume_reproduces_batches_and_dropped_captions(tmp_path):
    mixed_folder(tmp_path, {(64, 32): 5, (32, 64): 4})
    data = load_dataset(tmp_path, max_pixels=48 * 48, caption_dropout=0.5, seed=3)
    loader = make_dataloader(data, batch_size=2, seed=3, epoch=2)
    uninterrupted = [batch["prompt"] for batch in loader]

    loader = make_dataloader(data, batch_size=2, seed=3, epoch=2)
    it = iter(loader)
    head = [next(it)["prompt"] for _ in range(2)]
    state = loader.batch_sampler.state_dict()

    resumed = make_dataloader(data, batch_size=2, seed=3, epoch=0)
    resumed.batch_sampler.load_state_dict(state)
    assert head + [batch["prompt"] for batch in resumed] == uninterrupted
    assert "" in sum(uninterrupted, [])  # some captions were dropped (seeded: fixed outcome)


def test_loader_with_workers_matches_single_process(tmp_path):
    mixed_folder(tmp_path, {(64, 32): 3, (32, 64): 3})
    data = load_dataset(tmp_path, max_pixels=48 * 48, caption_dropout=0.5, seed=0)
    single = [batch["prompt"] for batch in make_dataloader(data, batch_size=2, seed=0, epoch=1)]
    loader = make_dataloader(data, batch_size=2, seed=0, num_workers=1, epoch=0)
    list(loader)  # epoch 0 starts the persistent worker
    loader.batch_sampler.set_epoch(1)  # the worker's dataset copy is never told: items carry their epoch
    assert [batch["prompt"] for batch in loader] == single


def test_caption_dropout_rate_and_determinism(tmp_path):
    samples = [Sample(f"s{i}", tmp_path / f"s{i}.png", f"caption {i}", 16, 16) for i in range(100)]
    data = TrainingDataset(samples, caption_dropout=0.3, repeat=40, seed=7)
    dropped = [data.caption_dropped(i, epoch=0) for i in range(len(data))]
    assert abs(sum(dropped) / len(dropped) - 0.3) < 0.03
    assert dropped == [TrainingDataset(samples, caption_dropout=0.3, repeat=40, seed=7).caption_dropped(i, 0)
                       for i in range(len(data))]
    assert dropped != [data.caption_dropped(i, epoch=1) for i in range(len(data))]
    assert not any(TrainingDataset(samples, repeat=2).caption_dropped(i, 0) for i in range(200))


def test_dropped_caption_is_empty_in_items(tmp_path):
    captioned(tmp_path, "a.png", 16, 16, "the caption")
    data = load_dataset(tmp_path, height=16, width=16, caption_dropout=0.5, repeat=50, seed=1)
    prompts = [data[(0, i)]["prompt"] for i in range(len(data))]
    assert set(prompts) == {"", "the caption"}
    assert prompts == [("" if data.caption_dropped(i, 0) else "the caption") for i in range(len(data))]


def test_repeat_shows_every_sample_n_times(tmp_path):
    mixed_folder(tmp_path, {(32, 32): 3, (64, 32): 2})
    data = load_dataset(tmp_path, max_pixels=32 * 32, repeat=3)
    assert len(data) == 15 and "repeat 3 -> 15 per epoch" in data.describe()
    prompts = [p for batch in make_dataloader(data, batch_size=4, seed=0) for p in batch["prompt"]]
    assert sorted(prompts) == sorted([f"caption {k}" for k in range(5)] * 3)


def test_collate_keeps_lists_and_pil():
    image = Image.new("RGB", (16, 16))
    batch = collate_samples([{"input_image": image, "prompt": "a", "x": 1},
                             {"input_image": image, "prompt": "b"}])
    assert batch == {"input_image": [image, image], "prompt": ["a", "b"], "x": [1, None]}
    assert isinstance(batch["input_image"][0], Image.Image)


def test_data_parallel_shards_are_disjoint_equal_and_cover_the_even_part():
    from diffusmith.training.buckets import BucketBatchSampler

    buckets = [(16, 16)] * 7 + [(32, 16)] * 4
    whole = BucketBatchSampler(buckets, batch_size=2, seed=3).batches_of_epoch(0)  # 6 batches
    shards = [list(BucketBatchSampler(buckets, 2, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 3
    assert sorted(map(tuple, shards[0] + shards[1])) == sorted(map(tuple, whole))
    with pytest.raises(DiffusmithError, match="rank"):
        BucketBatchSampler(buckets, 2, num_replicas=2, rank=2)
