"""Qwen-Image text encoder: prompt-embedding parity with diffusers' pipeline, key layouts, presets, converters."""

from __future__ import annotations

import pytest
import torch
from reference_text import build_tiny_tokenizer, save_tiny_tokenizer_vocab_files, tiny_reference_text_encoder
from safetensors.torch import load_file, save_file

from diffusmith.core.convert import KeyConverter
from diffusmith.errors import DiffusmithError
from diffusmith.models.qwen_image.text_encoder import (
    LEGACY_TO_CURRENT,
    PRESETS,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_DROP,
    build_text_encoder,
    detect_text_encoder_layout,
    encode_prompt,
    load_tokenizer,
    reset_buffers,
)

PROMPTS = [
    "A red circle",
    "Three small purple stars above a large orange rectangle, soft light from the left, on a grey wall.",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def reference():
    return tiny_reference_text_encoder(PRESETS["tiny"]["vocab_size"], seed=0)


@pytest.fixture(scope="module")
def ours(reference):
    model = build_text_encoder(PRESETS["tiny"])
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


def reference_encode(reference, tokenizer, prompts, max_sequence_length):
    from diffusers import QwenImagePipeline

    # encode_prompt only touches the tokenizer and the text encoder; the other components may be absent.
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=reference, tokenizer=tokenizer, transformer=None)
    with torch.no_grad():
        return pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=max_sequence_length)


def assert_same_encoding(ours_out, ref_out, atol=1e-5):
    (embeds, mask), (ref_embeds, ref_mask) = ours_out, ref_out
    assert embeds.shape == ref_embeds.shape
    assert embeds.dtype == ref_embeds.dtype == torch.float32
    diff = (embeds - ref_embeds).abs().max().item()
    assert diff <= atol, f"max abs diff {diff}"
    if ref_mask is None:
        assert mask is None
    else:
        assert mask is not None and mask.dtype == torch.long
        assert torch.equal(mask, ref_mask)


# ------------------------------------------------------------------------------------------------------------
# Parity with the reference pipeline
# ------------------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_template_prefix_is_34_tokens(tokenizer):
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    assert len(tokenizer(prefix)["input_ids"]) == PROMPT_TEMPLATE_DROP
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|image_pad|>"]) == [
        PRESETS["tiny"]["bos_token_id"],
        PRESETS["tiny"]["bos_token_id"] + 1,
        PRESETS["tiny"]["image_token_id"],
    ]
    assert len(tokenizer) <= PRESETS["tiny"]["vocab_size"]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_encode_prompt_matches_reference_with_padding(ours, reference, tokenizer, padding_side):
    tokenizer.padding_side = padding_side
    try:
        ref = reference_encode(reference, tokenizer, PROMPTS, 512)
        with torch.no_grad():
            out = encode_prompt(ours, tokenizer, PROMPTS, max_sequence_length=512)
    finally:
        tokenizer.padding_side = "right"
    assert ref[1] is not None and not bool(ref[1].all())  # the short prompt is padded
    assert out[0].shape[-1] == 32
    assert_same_encoding(out, ref)
    # Padded positions are zeros, as in the reference.
    assert torch.all(out[0][out[1] == 0] == 0)


def test_encode_prompt_single_prompt_has_no_mask(ours, reference, tokenizer):
    ref = reference_encode(reference, tokenizer, PROMPTS[:1], 512)
    with torch.no_grad():
        out = encode_prompt(ours, tokenizer, PROMPTS[:1])
    assert ref[1] is None
    assert_same_encoding(out, ref)


@pytest.mark.parametrize("max_sequence_length", [3, 12])
def test_encode_prompt_truncation_matches_reference(ours, reference, tokenizer, max_sequence_length):
    ref = reference_encode(reference, tokenizer, PROMPTS, max_sequence_length)
    with torch.no_grad():
        out = encode_prompt(ours, tokenizer, PROMPTS, max_sequence_length=max_sequence_length)
    assert out[0].shape[1] == max_sequence_length
    assert_same_encoding(out, ref)
    if max_sequence_length == 3:  # shorter than both prompts: every position is real
        assert out[1] is None


def test_encode_prompt_long_prompt_cut_like_reference(ours, reference, tokenizer):
    long_prompt = " ".join(["red circle blue square"] * 300)  # well over 1024 tokens
    prompts = [long_prompt, "a cat"]
    ref = reference_encode(reference, tokenizer, prompts, 1024)
    with torch.no_grad():
        out = encode_prompt(ours, tokenizer, prompts, max_sequence_length=1024)
    assert out[0].shape[1] == 1024
    assert_same_encoding(out, ref)


def test_encode_prompt_dtype_argument(ours, tokenizer):
    with torch.no_grad():
        embeds, _ = encode_prompt(ours, tokenizer, PROMPTS, dtype=torch.bfloat16)
    assert embeds.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [0, 2000, -1, 1025])
def test_encode_prompt_rejects_bad_max_sequence_length(ours, tokenizer, bad):
    with pytest.raises(DiffusmithError, match="max_sequence_length"):
        encode_prompt(ours, tokenizer, PROMPTS, max_sequence_length=bad)


def test_encode_prompt_rejects_empty_prompt_list(ours, tokenizer):
    with pytest.raises(DiffusmithError):
        encode_prompt(ours, tokenizer, [])


# ------------------------------------------------------------------------------------------------------------
# Key layouts, meta construction, buffers
# ------------------------------------------------------------------------------------------------------------


def test_legacy_layout_round_trip(reference, tokenizer, tmp_path):
    current = reference.state_dict()
    to_current = LEGACY_TO_CURRENT
    legacy = to_current.reverse().convert(current)
    assert set(legacy) != set(current)
    assert any(key.startswith("model.layers.") for key in legacy)
    assert any(key.startswith("visual.") for key in legacy)
    save_file({key: value.contiguous() for key, value in legacy.items()}, str(tmp_path / "model.safetensors"))

    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert detect_text_encoder_layout(loaded) == "legacy"
    converted = to_current.convert(loaded)
    assert detect_text_encoder_layout(converted) == "current"
    assert set(converted) == set(current)

    with torch.device("meta"):
        model = build_text_encoder(PRESETS["tiny"])
    model.load_state_dict(converted, strict=True, assign=True)
    reset_buffers(model)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    for (name, buffer), (ref_name, ref_buffer) in zip(model.named_buffers(), reference.named_buffers(), strict=False):
        assert name == ref_name and torch.equal(buffer, ref_buffer), name

    with torch.no_grad():
        expected = encode_prompt(reference, tokenizer, PROMPTS)
        got = encode_prompt(model, tokenizer, PROMPTS)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


def test_converting_current_keys_is_a_no_op(reference):
    keys = {key: None for key in reference.state_dict()}
    assert list(LEGACY_TO_CURRENT.convert(keys)) == list(keys)


def test_detect_layout_rejects_mixed_and_foreign_keys():
    with pytest.raises(DiffusmithError, match="mixes"):
        detect_text_encoder_layout(["model.layers.0.mlp.up_proj.weight", "model.language_model.norm.weight"])
    with pytest.raises(DiffusmithError, match="not a Qwen2.5-VL"):
        detect_text_encoder_layout(["transformer_blocks.0.attn.to_q.weight"])
    with pytest.raises(DiffusmithError):
        detect_text_encoder_layout([])


def test_real_preset_structure_on_meta():
    with torch.device("meta"):
        model = build_text_encoder(PRESETS["real"])
    config = model.config
    assert config.text_config.hidden_size == 3584 and config.text_config.num_hidden_layers == 28
    assert config.text_config.num_key_value_heads == 4 and config.text_config.vocab_size == 152064
    assert config.vision_config.depth == 32 and config.vision_config.hidden_size == 1280
    assert config.tie_word_embeddings is False
    legacy = LEGACY_TO_CURRENT.reverse().convert(model.state_dict())
    assert len(legacy) == 729
    assert round(sum(t.numel() for t in legacy.values()) / 1e9, 2) == 8.29
    prefixes = ("model.layers.", "model.embed_tokens.", "model.norm.", "visual.", "lm_head.")
    assert all(key.startswith(prefixes) for key in legacy)
    assert "lm_head.weight" in legacy and "model.embed_tokens.weight" in legacy
    assert detect_text_encoder_layout(legacy) == "legacy"


def test_build_text_encoder_rejects_other_model_types():
    with pytest.raises(DiffusmithError, match="qwen2_5_vl"):
        build_text_encoder({**PRESETS["tiny"], "model_type": "llama"})


def test_build_text_encoder_ignores_underscore_keys():
    with torch.device("meta"):
        model = build_text_encoder({**PRESETS["tiny"], "_name_or_path": "somewhere", "_diffusers_version": "0.1"})
    assert model.config.text_config.hidden_size == 32


# ------------------------------------------------------------------------------------------------------------
# Tokenizer loading
# ------------------------------------------------------------------------------------------------------------


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DiffusmithError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(DiffusmithError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_from_vocab_and_merges(tokenizer, tmp_path):
    save_tiny_tokenizer_vocab_files(tokenizer, tmp_path)
    other = load_tokenizer(tmp_path)
    texts = [PROMPT_TEMPLATE.format(prompt) for prompt in PROMPTS]
    assert other(texts, padding=True)["input_ids"] == tokenizer(texts, padding=True)["input_ids"]
    assert len(other) == len(tokenizer)


def test_auto_tokenizer_reads_tiny_tokenizer(tokenizer_dir, tokenizer):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    text = PROMPT_TEMPLATE.format(PROMPTS[1])
    assert auto(text)["input_ids"] == tokenizer(text)["input_ids"]


# ------------------------------------------------------------------------------------------------------------
# KeyConverter
# ------------------------------------------------------------------------------------------------------------


def test_key_converter_prefix_and_passthrough():
    converter = KeyConverter([("model.norm", "norm"), ("visual", "model.visual")])
    assert converter.convert_key("model.norm.weight") == "norm.weight"
    assert converter.convert_key("model.norm") == "norm"
    assert converter.convert_key("model.normalizer.weight") == "model.normalizer.weight"  # segment boundary
    assert converter.convert_key("visual.blocks.0.attn.qkv.bias") == "model.visual.blocks.0.attn.qkv.bias"
    assert converter.convert_key("lm_head.weight") == "lm_head.weight"
    assert converter.convert_key("xvisual.w") == "xvisual.w"


def test_key_converter_wildcards():
    converter = KeyConverter(
        [
            ("model.layers.{}.self_attn.{}_proj", "blocks.{}.attn.{}"),
            ("lora_unet_block_{}", "block.{}"),
        ]
    )
    assert converter.convert_key("model.layers.7.self_attn.q_proj.weight") == "blocks.7.attn.q.weight"
    assert converter.convert_key("model.layers.12.self_attn.o_proj.bias") == "blocks.12.attn.o.bias"
    # `{}` never spans a dot
    key = "model.layers.1.2.self_attn.q_proj.weight"
    assert converter.convert_key(key) == key
    assert converter.convert_key("lora_unet_block_3.alpha") == "block.3.alpha"


def test_key_converter_first_rule_wins():
    converter = KeyConverter([("a.b", "first"), ("a", "second")])
    assert converter.convert_key("a.b.c") == "first.c"
    assert converter.convert_key("a.x") == "second.x"


def test_key_converter_empty_sides_add_and_drop_prefixes():
    drop = KeyConverter([("diffusion_model", "")])
    assert drop.convert_key("diffusion_model.blocks.0.w") == "blocks.0.w"
    add = drop.reverse()
    assert add.convert_key("blocks.0.w") == "diffusion_model.blocks.0.w"


def test_key_converter_reverse_round_trip():
    converter = KeyConverter([("model.layers.{}.mlp", "blocks.{}.ff"), ("model.embed_tokens", "embed")])
    state = {"model.layers.3.mlp.up.weight": 1, "model.embed_tokens.weight": 2, "lm_head.weight": 3}
    forward = converter.convert(state)
    assert forward == {"blocks.3.ff.up.weight": 1, "embed.weight": 2, "lm_head.weight": 3}
    assert converter.reverse().convert(forward) == state
    assert converter.reverse().rules == (("blocks.{}.ff", "model.layers.{}.mlp"), ("embed", "model.embed_tokens"))


def test_key_converter_collision_is_an_error():
    converter = KeyConverter([("visual", "model.visual")])
    with pytest.raises(DiffusmithError, match="both become"):
        converter.convert({"visual.w": 1, "model.visual.w": 2})


@pytest.mark.parametrize("rule", [("a.{}", "b"), ("a.", "b"), (".a", "b"), ("a..b", "c"), ("", "x.{}")])
def test_key_converter_rejects_malformed_rules(rule):
    with pytest.raises(ValueError):
        KeyConverter([rule])
