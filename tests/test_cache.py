"""Split training: `diffusmith cache` then `train --cache` gives the same training, without the frozen models."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from test_training import config, losses, make_dataset

from diffusmith import DiffusmithError, QwenImagePipeline
from diffusmith.cli import main
from diffusmith.training.cache import FeatureCache
from diffusmith.training.runner import cache_features, train


@pytest.fixture
def data(tmp_path):
    folder = make_dataset(tmp_path / "data")
    (folder / "blue.txt").write_text("a much longer caption so that the prompts of a batch need padding here")
    return folder


@pytest.fixture
def cache(tiny_qwen, data, tmp_path):
    return cache_features(config(tiny_qwen[0], data, tmp_path / "unused"), tmp_path / "cache")


def test_the_plan_is_derived_from_the_units(cache):
    plan = FeatureCache(cache).plan
    assert plan.cached_units == ["QwenImageUnit_ShapeChecker", "QwenImageUnit_InputImageEmbedder",
                                 "QwenImageUnit_PromptEmbedder"]  # not the noise: it is drawn every step
    assert plan.stored == {"height": "shared", "width": "shared", "input_latents": "shared", "prompt_emb": "posi",
                           "prompt_emb_mask": "posi"}
    assert plan.aliases["QwenImageUnit_InputImageEmbedder"] == {"latents": "noise"}


def test_training_from_the_cache_equals_training_without_it(tiny_qwen, data, cache, tmp_path, monkeypatch):
    kw = dict(max_steps=4, batch_size=2, caption_dropout=0.4, save_every=2)
    direct, cached = tmp_path / "direct", tmp_path / "cached"
    train(config(tiny_qwen[0], data, direct, **kw))

    loaded = []
    original = QwenImagePipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        loaded.append(kwargs.get("models"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(QwenImagePipeline, "from_pretrained", classmethod(spy))
    train(config(tiny_qwen[0], data, cached, cache=str(cache), **kw))
    assert loaded == [["dit"]]  # no VAE, no text encoder
    assert losses(cached) == pytest.approx(losses(direct), abs=1e-5)
    a, b = load_file(direct / "lora.safetensors"), load_file(cached / "lora.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_a_stale_cache_is_refused(tiny_qwen, wide_qwen, data, cache, tmp_path):
    (data / "red.txt").write_text("an edited caption")
    with pytest.raises(DiffusmithError, match="stale: 1 of 3 samples changed"):
        train(config(tiny_qwen[0], data, tmp_path / "a", cache=str(cache)))


def test_a_cache_of_another_resolution_or_model_is_refused(tiny_qwen, wide_qwen, data, cache, tmp_path):
    with pytest.raises(DiffusmithError, match="height=64, this run uses height=32"):
        train(config(tiny_qwen[0], data, tmp_path / "a", cache=str(cache), height=32, width=32))
    with pytest.raises(DiffusmithError, match="another model"):
        train(config(wide_qwen, data, tmp_path / "b", cache=str(cache)))


def test_cache_folder_mistakes(tiny_qwen, data, cache, tmp_path):
    with pytest.raises(DiffusmithError, match="not empty"):
        cache_features(config(tiny_qwen[0], data, tmp_path / "x"), cache)
    with pytest.raises(DiffusmithError, match="not a diffusmith cache"):
        train(config(tiny_qwen[0], data, tmp_path / "c", cache=str(tmp_path)))


def test_cache_is_safetensors_and_json_only(cache):
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".safetensors"]
    index = json.loads((cache / "index.json").read_text())
    assert len(index["samples"]) == 3 and index["dropped_caption"]["shard"] == 0


def test_cache_command_line(tiny_qwen, data, tmp_path, capsys):
    out = tmp_path / "cli_cache"
    assert main(["cache", "--model", str(tiny_qwen[0]), "--dataset", str(data), "--output", str(out),
                 "--height", "64", "--width", "64", "--device", "cpu"]) == 0
    assert (out / "index.json").exists()
    assert main(["train", "--model", str(tiny_qwen[0]), "--dataset", str(data), "--cache", str(out), "--output",
                 str(tmp_path / "run"), "--height", "64", "--width", "64", "--device", "cpu", "--max-steps", "1"]) == 0


def test_inspect_describes_a_cache_folder(cache, data, capsys):
    assert main(["inspect", str(cache)]) == 0
    out = capsys.readouterr().out
    samples = len(list(data.glob("*.png")))
    assert f"diffusmith feature cache of {samples} samples" in out
    assert "QwenImageUnit_PromptEmbedder" in out and "input_latents" in out and "float32" in out
