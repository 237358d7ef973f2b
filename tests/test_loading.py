"""Weight loading: finding files, safetensors/pickle reading, meta init, filling modules, signatures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffusmith.core import signatures
from diffusmith.core.loading import (
    empty_weights,
    fill_module,
    find_weight_files,
    load_config,
    load_state_dict,
    read_safetensors_header,
    read_safetensors_metadata,
)
from diffusmith.core.signatures import Match, identify, identify_all, identify_file, register_signature
from diffusmith.errors import DiffusmithError


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)
        self.register_buffer("step", torch.tensor([3, 4], dtype=torch.int64))  # persistent, integer
        self.register_buffer("table", torch.arange(4.0) * 0.5, persistent=False)  # like a rotary table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x + self.table)))


def reference_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in TinyMLP().state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert value.dtype == b[k].dtype, k
        assert torch.equal(value, b[k]), k


def write_shards(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """Two shards + index in the layout of save_pretrained."""
    keys = list(state)
    parts = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    weight_map = {}
    for name, part in parts.items():
        save_file({k: state[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


# ------------------------------------------------------------------------------------------------
# finding and reading files
# ------------------------------------------------------------------------------------------------


def test_single_file(tmp_path: Path) -> None:
    state = reference_state()
    save_file(state, tmp_path / "w.safetensors")
    assert find_weight_files(tmp_path / "w.safetensors") == [tmp_path / "w.safetensors"]
    assert_same(load_state_dict(tmp_path / "w.safetensors"), state)


def test_folder_with_one_file(tmp_path: Path) -> None:
    state = reference_state()
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "training_args.bin").write_bytes(b"not looked at: safetensors win over pickles")
    assert find_weight_files(tmp_path) == [tmp_path / "diffusion_pytorch_model.safetensors"]
    assert_same(load_state_dict(str(tmp_path)), state)


def test_sharded_folder_with_index(tmp_path: Path) -> None:
    state = reference_state()
    index = write_shards(tmp_path, state)
    files = find_weight_files(tmp_path)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert_same(load_state_dict(tmp_path), state)
    assert_same(load_state_dict(index), state)  # the index itself is a valid path too
    header = read_safetensors_header(tmp_path)
    assert header == {k: (tuple(v.shape), "F32" if v.is_floating_point() else "I64") for k, v in state.items()}


def test_missing_shard_is_named(tmp_path: Path) -> None:
    write_shards(tmp_path, reference_state())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(DiffusmithError, match=r"shard model-00002-of-00002\.safetensors is missing"):
        load_state_dict(tmp_path)


def test_index_naming_keys_absent_from_shards(tmp_path: Path) -> None:
    index = write_shards(tmp_path, reference_state())
    data = json.loads(index.read_text())
    data["weight_map"]["extra.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(DiffusmithError, match="extra.weight"):
        load_state_dict(tmp_path)


def test_several_files_without_index(tmp_path: Path) -> None:
    state = reference_state()
    keys = list(state)
    save_file({k: state[k] for k in keys[:3]}, tmp_path / "a.safetensors")
    save_file({k: state[k] for k in keys[3:]}, tmp_path / "b.safetensors")
    assert_same(load_state_dict(tmp_path), state)
    save_file({keys[0]: state[keys[0]]}, tmp_path / "c.safetensors")  # a variant file beside them
    with pytest.raises(DiffusmithError, match=rf"{keys[0]} is in both a\.safetensors and c\.safetensors"):
        load_state_dict(tmp_path)
    with pytest.raises(DiffusmithError, match="in both"):
        read_safetensors_header(tmp_path)


def test_empty_folder_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DiffusmithError, match=r"no weight files in .*expected a \.safetensors file"):
        find_weight_files(tmp_path)
    sub = tmp_path / "transformer"
    sub.mkdir()
    save_file({"x": torch.zeros(1)}, sub / "diffusion_pytorch_model.safetensors")
    with pytest.raises(DiffusmithError, match="subfolders transformer hold weights"):
        load_state_dict(tmp_path)
    with pytest.raises(DiffusmithError, match="nope.safetensors does not exist"):
        load_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DiffusmithError, match="is not a weight file"):
        load_state_dict(tmp_path / "notes.txt")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "tiny", "bad_index"])
def test_corrupt_files(tmp_path: Path, damage: str) -> None:
    file = tmp_path / "w.safetensors"
    save_file({"big": torch.randn(64, 64), "small": torch.zeros(3)}, file)
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        file.write_bytes(bytes(range(256)) * 8)
    elif damage == "tiny":
        file.write_bytes(b"\x01\x02")
    else:
        (tmp_path / "model.safetensors.index.json").write_text("{not json")
        with pytest.raises(DiffusmithError, match=r"index\.json is not valid JSON"):
            load_state_dict(tmp_path)
        return
    for read in (load_state_dict, read_safetensors_header, find_and_identify):
        with pytest.raises(DiffusmithError, match=r"w\.safetensors is corrupt or truncated .*download it again"):
            read(file)


def find_and_identify(path: Path) -> Match:
    return identify_file(path)


def test_header_without_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.zeros(5, dtype=torch.int32)}, file,
              metadata={"rank": "4"})
    import safetensors
    import safetensors.torch

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensors must not be loaded")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    assert read_safetensors_header(file) == {"a": ((2, 3), "BF16"), "b": ((5,), "I32")}
    assert read_safetensors_metadata(file) == {"rank": "4"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_safetensors_are_memory_mapped(tmp_path: Path) -> None:
    def rss_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20

    # A sparse 64 MiB file: costs neither memory nor disk to write.
    n = 64 * 2**20
    header = json.dumps({"w": {"dtype": "F32", "shape": [n // 4], "data_offsets": [0, n]}}).encode()
    header += b" " * (-len(header) % 8)
    file = tmp_path / "big.safetensors"
    with open(file, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.truncate(8 + len(header) + n)
    before = rss_mib()
    state = load_state_dict(file)
    assert rss_mib() - before < 24  # nothing read eagerly
    assert float(state["w"][:: 1024].sum()) == 0.0  # touching every page makes it resident...
    assert rss_mib() - before > 48  # ...which shows the measurement can see a full read


def test_pickle_refused_then_allowed(tmp_path: Path) -> None:
    state = reference_state()
    for name in ("model.pt", "model.bin"):
        torch.save(state, tmp_path / name)
        with pytest.raises(DiffusmithError, match=r"pickle .*allow_pickle=True .*--allow-pickle"):
            load_state_dict(tmp_path / name)
        assert_same(load_state_dict(tmp_path / name, allow_pickle=True), state)


def test_pickle_folder_and_lightning_ckpt(tmp_path: Path) -> None:
    state = reference_state()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(DiffusmithError, match="allow_pickle"):
        load_state_dict(tmp_path)
    assert_same(load_state_dict(tmp_path, allow_pickle=True), state)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "last.ckpt")
    assert_same(load_state_dict(tmp_path / "last.ckpt", allow_pickle=True), state)
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert_same(load_state_dict(tmp_path / "legacy.pth", allow_pickle=True), state)


class NotATensor:
    pass


def test_pickle_with_objects_or_garbage(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2), "obj": NotATensor()}, tmp_path / "obj.pt")
    with pytest.raises(DiffusmithError, match="Python objects besides tensors"):
        load_state_dict(tmp_path / "obj.pt", allow_pickle=True)
    (tmp_path / "bad.bin").write_bytes(b"garbage" * 20)
    with pytest.raises(DiffusmithError, match="corrupt or truncated"):
        load_state_dict(tmp_path / "bad.bin", allow_pickle=True)


def test_load_config(tmp_path: Path) -> None:
    with pytest.raises(DiffusmithError, match="does not exist"):
        load_config(tmp_path / "missing")
    with pytest.raises(DiffusmithError, match=r"config\.json not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 1,}')
    with pytest.raises(DiffusmithError, match=r"config\.json is not valid JSON \(line 1"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(DiffusmithError, match="should hold a JSON object"):
        load_config(tmp_path)
    (tmp_path / "scheduler_config.json").write_text('{"shift": 1.0}')
    assert load_config(tmp_path, "scheduler_config.json") == {"shift": 1.0}
    assert load_config(tmp_path / "scheduler_config.json") == {"shift": 1.0}


# ------------------------------------------------------------------------------------------------
# empty_weights and fill_module
# ------------------------------------------------------------------------------------------------


def test_empty_weights_params_meta_buffers_real() -> None:
    original = nn.Module.register_parameter
    with empty_weights():
        model = TinyMLP()
    assert nn.Module.register_parameter is original
    assert all(p.is_meta for p in model.parameters())
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in model.parameters())
    assert torch.equal(model.table, torch.arange(4.0) * 0.5)  # non-persistent buffer is real
    assert torch.equal(model.step, torch.tensor([3, 4]))
    assert not TinyMLP().fc1.weight.is_meta  # patch undone


def test_empty_weights_restores_on_error() -> None:
    original = nn.Module.register_parameter
    with pytest.raises(RuntimeError, match="boom"), empty_weights():
        raise RuntimeError("boom")
    assert nn.Module.register_parameter is original


def test_fill_module_values_dtype_and_no_meta() -> None:
    state = reference_state()
    with empty_weights():
        model = TinyMLP()
    out = fill_module(model, state, what="MLP", dtype=torch.bfloat16)
    assert out is model
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and not p.is_meta and p.requires_grad
        assert torch.equal(p, state[name].to(torch.bfloat16))
    assert model.step.dtype == torch.int64 and torch.equal(model.step, state["step"])  # integers untouched
    assert model.table.dtype == torch.float32  # non-persistent buffers keep their precision
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_fill_module_keeps_checkpoint_dtype_and_shares_memory() -> None:
    state = {k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in reference_state().items()}
    with empty_weights():
        model = TinyMLP()
    fill_module(model, state, what="MLP")
    assert model.fc1.weight.dtype == torch.float16
    assert model.fc1.weight.data_ptr() == state["fc1.weight"].data_ptr()  # assigned, not copied


def test_fill_module_from_file_is_usable(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = TinyMLP()
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    with empty_weights():
        model = TinyMLP()
    fill_module(model, load_state_dict(tmp_path / "w.safetensors"), what="MLP")
    x = torch.randn(5, 4)
    assert torch.equal(model(x), source(x))


def test_mismatch_error_is_one_line_and_lists_everything() -> None:
    state = reference_state()
    del state["fc2.bias"]
    state["fc3.weight"] = torch.zeros(1)
    state["fc1.weight"] = torch.zeros(9, 4)
    with empty_weights():
        model = TinyMLP()
    with pytest.raises(DiffusmithError) as info:
        fill_module(model, state, what="tiny MLP")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("tiny MLP: checkpoint does not match: 1 missing keys (e.g. fc2.bias)")
    assert "1 unexpected keys (e.g. fc3.weight)" in message
    assert "1 shape mismatches (e.g. fc1.weight: ckpt (9, 4) vs model (8, 4))" in message
    assert "; check that the file" in message  # a hint always follows


def test_mismatch_hint_for_prefixed_keys() -> None:
    state = {f"model.diffusion_model.{k}": v for k, v in reference_state().items()}
    with empty_weights():
        model = TinyMLP()
    with pytest.raises(DiffusmithError, match="start with 'model.diffusion_model.'.*strip it"):
        fill_module(model, state, what="MLP")


def test_fill_module_strict_false() -> None:
    state = reference_state()
    del state["fc2.bias"]
    state["unused.weight"] = torch.zeros(2)
    # Built under empty_weights the missing parameter has no value: still an error.
    with empty_weights():
        model = TinyMLP()
    with pytest.raises(DiffusmithError, match=r"1 missing keys \(e.g. fc2.bias\)"):
        fill_module(model, state, what="MLP", strict=False)
    # Built normally, the missing parameter keeps its initial value and the extra key is ignored.
    torch.manual_seed(5)
    model = TinyMLP()
    kept = model.fc2.bias.detach().clone()
    fill_module(model, state, what="MLP", strict=False, dtype=torch.bfloat16)
    assert torch.equal(model.fc2.bias, kept.to(torch.bfloat16))
    assert torch.equal(model.fc1.weight, state["fc1.weight"].to(torch.bfloat16))
    # Shape mismatches are never tolerated.
    state["fc1.weight"] = torch.zeros(1, 1)
    with pytest.raises(DiffusmithError, match="shape mismatches"):
        fill_module(TinyMLP(), state, what="MLP", strict=False)


def test_fill_module_inside_empty_weights_and_meta_leftovers() -> None:
    state = reference_state()
    with empty_weights():
        model = TinyMLP()
        fill_module(model, state, what="MLP")  # must not be sent back to meta
    assert not model.fc1.weight.is_meta

    class Broken(TinyMLP):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("lost", torch.empty(2, device="meta"), persistent=False)

    with empty_weights():
        broken = Broken()
    with pytest.raises(DiffusmithError, match="still on the meta device .*lost"):
        fill_module(broken, reference_state(), what="MLP")
    with empty_weights():
        meta_state = TinyMLP().state_dict()
    with pytest.raises(DiffusmithError, match="fc1.weight is on the meta device"):
        fill_module(TinyMLP(), meta_state, what="MLP")


def test_fill_module_keeps_tied_weights() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    with empty_weights():
        model = Tied()
    weight = torch.randn(10, 4)
    fill_module(model, {"embed.weight": weight}, what="tied", dtype=torch.bfloat16)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.head.weight, weight.to(torch.bfloat16))


# ------------------------------------------------------------------------------------------------
# signatures
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def test_signatures():
    names = ["test-mlp", "test-mlp-big", "test-dit"]
    register_signature("test-mlp", required={"fc1.weight": None, "fc2.weight": None},
                       describe="any two-layer MLP")
    register_signature("test-mlp-big", required={"fc1.weight": (8, 4), "fc2.weight": None, "step": (2,)},
                       describe="the TinyMLP")
    register_signature("test-dit", required={"img_in.weight": (3072, 64), "blocks.0.attn.weight": None},
                       prefixes=signatures.DIFFUSION_MODEL_PREFIXES, describe="a DiT", any_size=True)
    yield names
    for name in names:
        signatures.unregister_signature(name)


def test_identify_with_and_without_prefix(test_signatures: list[str]) -> None:
    shapes = {"img_in.weight": (3072, 64), "blocks.0.attn.weight": (3, 3)}
    assert identify(shapes) == Match("test-dit", "", "a DiT", exact=True)
    prefixed = {f"model.diffusion_model.{k}": v for k, v in shapes.items()}
    assert identify(prefixed) == Match("test-dit", "model.diffusion_model.", "a DiT", exact=True)
    # any_size: a tiny variant still matches, flagged as not exact
    tiny = {"diffusion_model.img_in.weight": (32, 64), "diffusion_model.blocks.0.attn.weight": (3, 3)}
    assert identify(tiny) == Match("test-dit", "diffusion_model.", "a DiT", exact=False)
    assert identify({"img_in.weight": (3072, 64)}) is None  # a required key is missing
    assert identify({"vae.img_in.weight": (3072, 64), "vae.blocks.0.attn.weight": ()}) is None  # unknown prefix


def test_most_specific_match_wins(test_signatures: list[str]) -> None:
    mlp = {k: tuple(v.shape) for k, v in reference_state().items()}
    assert [m.name for m in identify_all(mlp)][:2] == ["test-mlp-big", "test-mlp"]
    other = {"fc1.weight": (5, 5), "fc2.weight": (1, 5), "step": (2,)}  # big needs fc1 (8, 4), not any_size
    assert identify(other).name == "test-mlp"


def test_identify_file(tmp_path: Path, test_signatures: list[str]) -> None:
    save_file({f"model.diffusion_model.{k}": v for k, v in reference_state().items()}, tmp_path / "a.safetensors")
    with pytest.raises(DiffusmithError, match=r"cannot tell which model .*a\.safetensors is: 5 tensors, first keys"):
        identify_file(tmp_path / "a.safetensors")
    save_file(reference_state(), tmp_path / "b.safetensors")
    assert identify_file(tmp_path / "b.safetensors").name == "test-mlp-big"


def test_mismatch_hint_names_identified_checkpoint(test_signatures: list[str]) -> None:
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(2, 2)

    with empty_weights():
        model = Other()
    with pytest.raises(DiffusmithError, match=r"it looks like a test-mlp-big checkpoint \(the TinyMLP\)"):
        fill_module(model, reference_state(), what="other")


def test_register_signature_conflicts(test_signatures: list[str]) -> None:
    register_signature("test-mlp", required={"fc1.weight": None, "fc2.weight": None}, describe="any two-layer MLP")
    with pytest.raises(ValueError, match="already registered"):
        register_signature("test-mlp", required={"fc1.weight": None})


# ------------------------------------------------------------------------------------------------
# Qwen-Image signatures against the reference implementations' real key names (tiny sizes)
# ------------------------------------------------------------------------------------------------


def test_qwen_image_dit_and_vae_signatures(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    dit = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    )
    save_file({f"model.diffusion_model.{k}": v for k, v in dit.state_dict().items()}, tmp_path / "dit.safetensors")
    match = identify_file(tmp_path / "dit.safetensors")
    assert (match.name, match.prefix, match.exact) == ("qwen_image.dit", "model.diffusion_model.", False)

    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1)
    assert identify({k: tuple(v.shape) for k, v in vae.state_dict().items()}).name == "qwen_image.vae"

    # The default configs are the real sizes: built on meta (free), their shapes match exactly.
    with empty_weights():
        real = [diffusers.QwenImageTransformer2DModel(num_layers=1), diffusers.AutoencoderKLQwenImage()]
    for model, name in zip(real, ["qwen_image.dit", "qwen_image.vae"], strict=False):
        match = identify({k: tuple(v.shape) for k, v in model.state_dict().items()})
        assert (match.name, match.exact) == (name, True)


def test_qwen2_5_vl_signatures() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32},
    )
    with empty_weights():
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert identify(shapes).name == "qwen_image.text_encoder"
    legacy = {}
    for key, shape in shapes.items():
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        legacy[key] = shape
    assert identify(legacy).name == "qwen_image.text_encoder.legacy"
