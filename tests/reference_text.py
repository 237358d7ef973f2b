"""Offline stand-ins for Qwen-Image's text side: a tiny Qwen2 tokenizer and a tiny random reference text encoder.

No hub access is needed. The tokenizer is a byte-level BPE trained on a few sentences (the chat template text
among them, so the template prefix is 34 tokens, as with the real tokenizer) with the Qwen2.5-VL special
tokens appended in their real order. The text encoder is transformers' own Qwen2.5-VL model with the "tiny"
preset, randomly initialised: the reference that our code is compared with.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from diffusmith.models.qwen_image.text_encoder import PRESETS

# BPE entries before the special tokens: <|endoftext|> gets this id (the "tiny" preset's ids rely on it).
TINY_BPE_SIZE = 400

# Qwen2.5-VL's added tokens, in id order after <|endoftext|> (which Qwen2Tokenizer adds itself).
SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PLAIN_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

_SYSTEM = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
    "of the objects and background:"
)
_SENTENCES = [
    "A red circle next to a blue square.",
    "A green triangle on a yellow background.",
    "Three small purple stars above a large orange rectangle.",
    "A white cat sitting on a black chair, soft light from the left.",
    "Two brown dogs running across a wide green field at sunset.",
    "A tall glass of water on a wooden table, smooth texture.",
    "The word HELLO written in bold pink letters on a grey wall.",
    "A round clock with silver hands hanging above the door.",
    "Five striped balloons, red, blue and yellow, floating in the sky.",
    "A small house with a red roof and a blue door beside a river.",
    "An oval mirror reflecting a bright window and a potted plant.",
    "A hexagon made of thin gold lines on dark velvet.",
    "Rough stone steps leading to an old castle in the fog.",
    "A bowl of green apples and one yellow banana on a white plate.",
    "A cube, a sphere and a cylinder arranged in a row, studio lighting.",
    "A child holding a kite shaped like a fish on a windy beach.",
    "Snow falling on a quiet street with warm yellow lamps.",
    "A cup of coffee with a heart drawn in the foam.",
    "Many tiny dots forming a spiral pattern in cyan and magenta.",
    "A bicycle leaning against a brick wall covered in ivy.",
]


def _train_bpe() -> Tokenizer:
    tokenizer = Tokenizer(BPE())
    # The same normaliser and pre-tokeniser as transformers' Qwen2Tokenizer, so the trained merges fit it.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # The template turns are repeated so their words are merged into single tokens first, as in the real vocab.
    corpus = ["system\n" + _SYSTEM + "\nuser\n", "assistant\n"] * 20 + _SENTENCES
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    if tokenizer.get_vocab_size() != TINY_BPE_SIZE:
        raise RuntimeError(f"tiny BPE has {tokenizer.get_vocab_size()} entries, expected {TINY_BPE_SIZE}")
    return tokenizer


def build_tiny_tokenizer(save_dir: str | Path) -> Qwen2Tokenizer:
    """A Qwen2 tokenizer with a 400-entry BPE and the Qwen2.5-VL special tokens (ids 400..421), saved with
    ``save_pretrained`` to ``save_dir`` (tokenizer.json + tokenizer_config.json) and returned."""
    bpe = _train_bpe()
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges, model_max_length=131072)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.eos_token = "<|im_end|>"  # set after the specials are added, so <|endoftext|> keeps id 400
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in PLAIN_ADDED_TOKENS])
    expected = TINY_BPE_SIZE + 1 + len(SPECIAL_TOKENS) + len(PLAIN_ADDED_TOKENS)
    if len(tokenizer) != expected or tokenizer.convert_tokens_to_ids("<|endoftext|>") != TINY_BPE_SIZE:
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {expected}")
    tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def save_tiny_tokenizer_vocab_files(tokenizer: Qwen2Tokenizer, save_dir: str | Path) -> None:
    """Write ``tokenizer`` in the hub's older layout (vocab.json + merges.txt + tokenizer_config.json with the
    added tokens, no tokenizer.json), the form the Qwen-Image repository ships."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    (save_dir / "vocab.json").write_text(json.dumps(state["model"]["vocab"], ensure_ascii=False))
    merges = ["#version: 0.2"] + [" ".join(pair) for pair in state["model"]["merges"]]
    (save_dir / "merges.txt").write_text("\n".join(merges) + "\n")
    added = {
        str(entry["id"]): {
            "content": entry["content"],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": entry["special"],
        }
        for entry in state["added_tokens"]
    }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS),
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    (save_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def tiny_reference_text_encoder(vocab_size: int | None = None, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """transformers' Qwen2.5-VL with the "tiny" preset (text width 32), random weights from ``seed``, eval mode.

    The weights are redrawn wider than transformers' init (std 0.02 leaves attention nearly uniform, so a wrong
    position or mask would hardly show): matrices N(0, 0.3), biases N(0, 0.1), norm scales 1 + N(0, 0.1)."""
    config = dict(PRESETS["tiny"])
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:
                param.copy_(0.3 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:  # RMSNorm scales
                param.copy_(1.0 + 0.1 * noise)
    return model
