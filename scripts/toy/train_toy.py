"""The recipe of toy/qwen-image-toy: a Qwen-Image-architecture model at toy size, trained on CPU in ~20 min.

Every part has Qwen-Image's architecture and file layout, at toy size, and the result loads like any checkpoint
(``QwenImagePipeline.from_pretrained("toy/qwen-image-toy")``, also diffusers' pipeline):

1. data       4000 procedurally drawn, captioned 64x64 pictures (scripts/toy/shapes.py; purple held out);
2. tokenizer  a byte-level BPE trained on the prompt template + caption words, as a Qwen2 tokenizer with the
              Qwen2.5-VL special tokens (the template prefix is 34 tokens, as with the real one);
3. text enc.  a tiny Qwen2.5-VL (text width 64), random from a fixed seed and frozen: the DiT learns to read it;
4. VAE        our QwenImageVAE (z_dim 16, base width 8) trained here as an autoencoder (reconstruction + a
              small KL term), then ``latents_mean/std`` measured on the data so normalized latents are ~N(0, 1);
5. DiT        a toy QwenImageDiT (width 128, 6 blocks) saved at random init, then trained by diffusmith's own
              trainer: ``cache_features`` + ``train(TrainConfig(full=True, cache=...))``, the Python side of
              ``diffusmith cache`` / ``diffusmith train --full --cache``.

    python scripts/toy/train_toy.py                     # writes toy/qwen-image-toy/, works in out/toy-work/
    python scripts/toy/train_toy.py --dit-steps 300     # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from diffusmith import QwenImagePipeline
from diffusmith.models.qwen_image.dit import QwenImageDiT, QwenImageDiTConfig
from diffusmith.models.qwen_image.text_encoder import PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP, build_text_encoder
from diffusmith.models.qwen_image.vae import CausalConv3d, QwenImageVAE, QwenImageVAEConfig, ResidualBlock
from diffusmith.training.runner import TrainConfig, cache_features, train

sys.path.insert(0, str(Path(__file__).parent))
import grid  # noqa: E402
import shapes  # noqa: E402

logger = logging.getLogger("train_toy")
ROOT = Path(__file__).resolve().parents[2]
DIFFUSERS_VERSION = "0.42.1"  # the reference release whose file layout the toy follows

# Qwen-Image's scheduler_config.json (the official values)
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
MODEL_INDEX = {
    "_class_name": "QwenImagePipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}

# ---- sizes ------------------------------------------------------------------------------------------------
TEXT_WIDTH = 64
BPE_SIZE = 480  # at most: the trainer stops when the corpus has no pair left to merge (445 here)
VAE_CONFIG = dict(base_dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2)
DIT_CONFIG = dict(num_layers=6, num_attention_heads=4, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
                  joint_attention_dim=TEXT_WIDTH)

# Qwen2.5-VL's added tokens in id order after <|endoftext|> (which Qwen2Tokenizer adds itself)
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                  "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
PLAIN_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                      "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
# words a user might try that the pictures never show: the tokenizer knows them, the DiT does not
EXTRA_WORDS = ("purple", "orange", "pink", "brown", "grey", "cyan", "star", "hexagon", "heart", "below", "right of")

PREVIEW_PROMPTS = (
    "a red circle on a blue background, center, large",
    "a yellow square on a black background, top left, small",
    "a green triangle on a white background, right, large",
    "a white circle on a red background, bottom, large",
    "a blue square left of a yellow circle on a green background",
    "a black triangle above a white square on a blue background",
    "a purple circle on a white background, center, large",
)


# ---- 2. tokenizer -----------------------------------------------------------------------------------------
def build_tokenizer(captions: list[str], folder: Path) -> Qwen2Tokenizer:
    """Byte-level BPE on templated captions, wrapped as a Qwen2 tokenizer with the Qwen2.5-VL specials."""
    bpe = Tokenizer(BPE())
    # transformers' Qwen2Tokenizer normaliser and pre-tokeniser, so the trained merges fit it
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    extra = [f"a {w} {s} on a {b} background" for w in EXTRA_WORDS for s in shapes.SHAPES for b in shapes.COLOURS]
    # the template without its special tokens, around every caption: its words become single tokens first
    corpus = [re.sub(r"<\|[a-z_]+\|>", "", PROMPT_TEMPLATE.format(c)) for c in [*captions, *extra]]
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges, model_max_length=131072)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    n_prefix = len(tokenizer(prefix)["input_ids"])
    if n_prefix != PROMPT_TEMPLATE_DROP:
        raise RuntimeError(f"the template prefix is {n_prefix} tokens, Qwen-Image drops {PROMPT_TEMPLATE_DROP}")
    save_tokenizer_files(tokenizer, folder)
    example = tokenizer.tokenize(PREVIEW_PROMPTS[-1])
    logger.info("tokenizer: %d entries; %r -> %s", len(tokenizer), PREVIEW_PROMPTS[-1], example)
    return tokenizer


def save_tokenizer_files(tokenizer: Qwen2Tokenizer, folder: Path) -> None:
    """The layout Qwen/Qwen-Image ships (vocab.json + merges.txt + tokenizer_config.json listing the added
    tokens), which old and new transformers releases both read."""
    folder.mkdir(parents=True, exist_ok=True)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    (folder / "vocab.json").write_text(json.dumps(state["model"]["vocab"], ensure_ascii=False))
    merges = ["#version: 0.2"] + [" ".join(pair) for pair in state["model"]["merges"]]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    added = {str(t["id"]): {"content": t["content"], "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": t["special"]} for t in state["added_tokens"]}
    config = {"added_tokens_decoder": added, "additional_special_tokens": list(SPECIAL_TOKENS), "bos_token": None,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
              "model_max_length": 131072, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---- 3. text encoder --------------------------------------------------------------------------------------
def text_encoder_config(tokenizer: Qwen2Tokenizer) -> dict:
    """A tiny Qwen2.5-VL (text width 64, 2 layers, a 1-block vision tower) whose token ids fit ``tokenizer``."""
    ids = tokenizer.convert_tokens_to_ids
    vocab = -(-len(tokenizer) // 64) * 64
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"), "hidden_act": "silu",
        "hidden_size": TEXT_WIDTH, "intermediate_size": 2 * TEXT_WIDTH, "max_position_embeddings": 2048,
        "max_window_layers": 2, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        # head dim 16 -> 8 rotary frequencies split over (time, height, width)
        "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
        "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": vocab,
        "image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>"),
        "vision_token_id": ids("<|vision_pad|>"),
        "vision_config": {
            "depth": 1, "fullatt_block_indexes": [0], "hidden_act": "silu", "hidden_size": 16, "in_channels": 3,
            "intermediate_size": 32, "model_type": "qwen2_5_vl", "num_heads": 2, "out_hidden_size": TEXT_WIDTH,
            "patch_size": 2, "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 2,
            "window_size": 8,
        },
    }


def build_frozen_text_encoder(tokenizer: Qwen2Tokenizer, folder: Path, seed: int) -> None:
    """Random Qwen2.5-VL from ``seed``: token embeddings N(0, 1), matrices N(0, 1/fan_in), saved by transformers
    (weights in the current key layout) with the flat config.json the real checkpoint has. Each output state is
    dominated by its own token (changing one word leaves the others' states at cosine 0.998, measured): the DiT
    reads word order through its own rotary positions."""
    torch.manual_seed(seed)
    model = build_text_encoder(text_encoder_config(tokenizer))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "embed_tokens" in name:
                param.copy_(noise)
            elif param.ndim > 1:
                fan_in = param[0].numel()
                param.copy_(noise / fan_in**0.5)
            elif name.endswith("bias"):
                param.zero_()
            else:  # RMSNorm scales
                param.fill_(1.0)
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "generation_config.json").unlink(missing_ok=True)  # text generation settings: unused by an encoder
    # the flat config.json of the real checkpoint, which every transformers release since Qwen2.5-VL reads
    flat = {**text_encoder_config(tokenizer), "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(flat, indent=2) + "\n")


# ---- 4. VAE -----------------------------------------------------------------------------------------------
def pictures_to_tensor(pictures) -> torch.Tensor:
    """PIL pictures -> (N, 3, 64, 64) uint8."""
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(p, dtype=np.uint8) for p in pictures])).permute(0, 3, 1, 2)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def init_vae_for_training(vae: QwenImageVAE) -> None:
    """Fan-in initialisation of every conv (counting only the kernel slice a single frame uses) and residual
    blocks that start as the identity. PyTorch's default init shrinks the signal ~3x per conv here: at init
    the latents of flat pictures of six colours differed ~4x less than the border artefacts within one, and
    overfitting 16 pictures stalled at MSE 0.3 after 150 steps; with this init it reaches 0.01. The posterior
    log-variance starts at -4 (std 0.14) so the sampled latents carry the signal from the first step."""
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                used = module.weight[:, :, -1] if isinstance(module, CausalConv3d) else module.weight
                used.normal_(0.0, used[0].numel() ** -0.5)
                module.bias.zero_()
        for module in vae.modules():
            if isinstance(module, ResidualBlock):
                module.conv2.weight.zero_()
        vae.quant_conv.bias[vae.config.z_dim:] = -4.0


def train_vae(pool: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float,
              seed: int) -> QwenImageVAE:
    """Autoencoder training of our QwenImageVAE: L1 + MSE reconstruction of a sampled posterior, plus a small
    KL term that keeps the latent space smooth enough for the decoder to forgive the DiT's small errors."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    config = QwenImageVAEConfig(**VAE_CONFIG, latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16)
    vae = QwenImageVAE(config).train()
    init_vae_for_training(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=max(0.05, 2 / steps))  # >= 2 warm-up steps
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="vae", unit="step")
    for step in bar:
        x = to_unit(pool[torch.randint(len(pool), (batch_size,), generator=generator)])
        if step < int(steps * 0.85):  # random 32x32 crops: 4x cheaper; the last steps see whole pictures
            top, left = torch.randint(0, 33, (2,), generator=generator).tolist()
            x = x[:, :, top:top + 32, left:left + 32]
        moments = vae.quant_conv(vae.encoder(x))  # (B, 2z, 8, 8)
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        recon = vae.decode_tile(z)
        rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.3f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_statistics(vae: QwenImageVAE, pictures: torch.Tensor) -> tuple[list[float], list[float], float]:
    """Per-channel mean and std of the posterior means over ``pictures``, and the reconstruction PSNR."""
    means, mse = [], 0.0
    for chunk in pictures.split(256):
        x = to_unit(chunk)
        mean = vae.encode_tile(x)  # (B, z, 8, 8) raw
        mse += (vae.decode_tile(mean).clamp(-1, 1) - x).pow(2).mean().item() * len(chunk)
        means.append(mean)
    z = torch.cat(means).transpose(0, 1).flatten(1)  # (z, N*h*w)
    psnr = 10 * torch.log10(torch.tensor(4.0 / (mse / len(pictures)))).item()  # range [-1, 1] -> peak 2
    return z.mean(1).tolist(), z.std(1).tolist(), psnr


def save_vae(vae: QwenImageVAE, mean: list[float], std: list[float], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = QwenImageVAEConfig(**VAE_CONFIG, latents_mean=tuple(round(v, 5) for v in mean),
                                latents_std=tuple(round(v, 5) for v in std))
    body = {"_class_name": "AutoencoderKLQwenImage", "_diffusers_version": DIFFUSERS_VERSION, **config.to_dict()}
    (folder / "config.json").write_text(json.dumps(body, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}  # diffusers key names already
    save_file(state, folder / "diffusion_pytorch_model.safetensors")


# ---- 5. DiT -----------------------------------------------------------------------------------------------
def save_initial_dit(folder: Path, seed: int) -> None:
    """Random DiT with adaLN-zero (modulations and output projection start at 0: every block starts as the
    identity), the usual DiT initialisation, in the official transformer/ layout."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = QwenImageDiTConfig(**DIT_CONFIG)
    dit = QwenImageDiT(config)
    with torch.no_grad():
        for block in dit.transformer_blocks:
            for mod in (block.img_mod[1], block.txt_mod[1]):
                mod.weight.zero_()
                mod.bias.zero_()
        for linear in (dit.norm_out.linear, dit.proj_out):
            linear.weight.zero_()
            linear.bias.zero_()
    body = {"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
            "attention_head_dim": config.attention_head_dim, "axes_dims_rope": list(config.axes_dims_rope),
            "guidance_embeds": False, "in_channels": config.in_channels,
            "joint_attention_dim": config.joint_attention_dim, "num_attention_heads": config.num_attention_heads,
            "num_layers": config.num_layers, "out_channels": config.out_channels, "patch_size": config.patch_size}
    (folder / "config.json").write_text(json.dumps(body, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, folder / "diffusion_pytorch_model.safetensors")


def preview(model: Path, out: Path, steps: int = 20, seeds: tuple[int, ...] = (0, 1, 2, 3)) -> None:
    pipe = QwenImagePipeline.from_pretrained(model)
    rows = [[pipe(prompt=p, height=64, width=64, num_inference_steps=steps, seed=s, progress_bar=False)
             for s in seeds] for p in PREVIEW_PROMPTS]
    sheet = grid.labelled_grid([list(r) for r in zip(*rows, strict=True)], [f"seed {s}" for s in seeds],
                               PREVIEW_PROMPTS, scale=2)
    sheet.save(out)
    logger.info("preview: %s", out)


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def build_frozen_parts(args: argparse.Namespace, work: Path, staging: Path, times: dict[str, float]) -> dict:
    """Stages 1-4: the data, the tokenizer and text encoder, the trained VAE, the scheduler and model index."""
    t = time.perf_counter()
    scenes = shapes.write_dataset(work / "data", args.count, seed=args.seed)
    captions = sorted({s.caption for s in scenes})
    rng = random.Random(args.seed + 1)
    vae_pool = pictures_to_tensor([shapes.render_scene(s) for s in scenes]
                                  + [shapes.random_colour_picture(rng) for _ in range(args.count // 2)])
    times["data"] = time.perf_counter() - t
    logger.info("data: %d captioned pictures (%d distinct captions), %d VAE pictures", len(scenes),
                len(captions), len(vae_pool))

    t = time.perf_counter()
    tokenizer = build_tokenizer(captions, staging / "tokenizer")
    build_frozen_text_encoder(tokenizer, staging / "text_encoder", seed=args.seed + 2)
    times["text"] = time.perf_counter() - t

    t = time.perf_counter()
    vae = train_vae(vae_pool, args.vae_steps, args.batch_size, lr=1e-3, kl_weight=1e-4, seed=args.seed + 3)
    mean, std, psnr = latent_statistics(vae, vae_pool[: args.count])
    save_vae(vae, mean, std, staging / "vae")
    times["vae"] = time.perf_counter() - t
    logger.info("VAE: reconstruction PSNR %.1f dB on the captioned pictures; latent std %.3f..%.3f", psnr,
                min(std), max(std))

    (staging / "scheduler").mkdir(parents=True)
    (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    (staging / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    check = [*range(6), *range(args.count, args.count + 4)]  # captioned pictures, then random-colour ones
    with torch.no_grad():
        recon = vae.decode_tile(vae.encode_tile(to_unit(vae_pool[check]))).clamp(-1, 1)
    grid.labelled_grid([[shapes_image(vae_pool[i]) for i in check], [shapes_image((r + 1) * 127.5) for r in recon]],
                       ["input", "VAE"], [str(i) for i in check]).save(work / "vae_check.png")
    return {"psnr": psnr}


def shapes_image(x: torch.Tensor):
    """(3, H, W) 0..255 tensor -> PIL picture."""
    from PIL import Image

    return Image.fromarray(x.float().round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "toy" / "qwen-image-toy"))
    parser.add_argument("--work", default=str(ROOT / "out" / "toy-work"), help="data, cache and run folders")
    parser.add_argument("--count", type=int, default=4000, help="captioned pictures the DiT trains on")
    parser.add_argument("--vae-steps", type=int, default=1800)
    parser.add_argument("--dit-steps", type=int, default=3500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    # one thread: on a shared 2-core machine two threads spin-wait on each other (measured 5x slower under load)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reuse", action="store_true",
                        help="keep the tokenizer, text encoder, VAE and feature cache of the last run in --work; "
                             "train only the DiT again")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    staging = work / "model"  # built here, copied to --out once complete
    state_file = work / "stages.json"  # times and VAE quality of the stages a --reuse run keeps
    if args.reuse:
        if not state_file.exists():
            raise SystemExit(f"--reuse: no complete earlier run in {work}")
        state = json.loads(state_file.read_text())
        if state["args"] != {k: getattr(args, k) for k in ("count", "vae_steps", "seed")}:
            raise SystemExit(f"--reuse: {work} was made with {state['args']}; use the same options")
        shutil.rmtree(work / "run", ignore_errors=True)
        shutil.rmtree(staging / "transformer", ignore_errors=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        state = {"args": {k: getattr(args, k) for k in ("count", "vae_steps", "seed")}, "times": {}}
        state.update(build_frozen_parts(args, work, staging, state["times"]))
    times = state["times"]
    save_initial_dit(staging / "transformer", seed=args.seed + 4)

    # the DiT, trained by diffusmith's own trainer from a feature cache (VAE latents + prompt embeddings)
    config = TrainConfig(model=str(staging), dataset=str(work / "data"), output=str(work / "run"), full=True,
                         height=64, width=64, batch_size=args.batch_size, caption_dropout=0.1,
                         learning_rate=args.lr, lr_schedule="cosine", warmup_steps=min(200, args.dit_steps // 10),
                         max_steps=args.dit_steps, seed=args.seed, cache=str(work / "cache"), device="cpu")
    if not args.reuse:
        t = time.perf_counter()
        cache_features(config, work / "cache")
        times["cache"] = time.perf_counter() - t
        state_file.write_text(json.dumps(state, indent=2))
    t = time.perf_counter()
    final = train(config)
    times["dit"] = time.perf_counter() - t
    shutil.copyfile(final, staging / "transformer" / "diffusion_pytorch_model.safetensors")

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(staging, out)
    write_model_card(out, args, times, state["psnr"], args.count)
    shutil.copyfile(work / "run" / "logs" / "metrics.csv", work / "dit_metrics.csv")
    preview(out, work / "preview.png")
    for part in sorted(p for p in out.iterdir() if p.is_dir()):
        print(f"{part.name:14s} {folder_size(part) / 1e6:6.2f} MB")
    print(f"{'total':14s} {folder_size(out) / 1e6:6.2f} MB in {out}")
    print("times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f", total {sum(times.values()):.0f}s")


def write_model_card(out: Path, args: argparse.Namespace, times: dict[str, float], psnr: float, count: int) -> None:
    bpe_entries = len(json.loads((out / "tokenizer" / "vocab.json").read_text()))
    width = DIT_CONFIG["num_attention_heads"] * DIT_CONFIG["attention_head_dim"]
    rows = [
        ("tokenizer", f"byte-level BPE ({bpe_entries} entries) + the Qwen2.5-VL special tokens",
         "on the captions + template"),
        ("text_encoder", f"Qwen2.5-VL, text width {TEXT_WIDTH}, 2 layers, 1-block vision tower",
         "no: random (seeded), frozen"),
        ("vae", f"QwenImageVAE, z_dim 16, base width {VAE_CONFIG['base_dim']}, 8x downsampling",
         f"{args.vae_steps} steps, PSNR {psnr:.1f} dB"),
        ("transformer", f"QwenImageDiT, {DIT_CONFIG['num_layers']} blocks, width {width}, "
         f"joint_attention_dim {TEXT_WIDTH}", f"{args.dit_steps} steps x batch {args.batch_size} on {count} pictures"),
        ("scheduler", "Qwen-Image's scheduler_config.json", "-"),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
    text = f"""# qwen-image-toy

A Qwen-Image-architecture model at toy size ({folder_size(out) / 1e6:.0f} MB), trained on CPU by
`scripts/toy/train_toy.py` (the DiT by diffusmith's own trainer). It is for demos and tests, not for art: it
loads like any checkpoint in the official layout (diffusers' `QwenImagePipeline` reads it too).

```python
from diffusmith import QwenImagePipeline
pipe = QwenImagePipeline.from_pretrained("toy/qwen-image-toy")
pipe(prompt="a red circle on a blue background, top left, small", height=64, width=64,
     num_inference_steps=20, seed=0).save("toy.png")
```

It draws 64x64 pictures (8x8 latents, 16 DiT tokens) of what it was trained on: circles, squares and
triangles in {", ".join(shapes.COLOURS)} on a plain background of another of these colours,
at a position (center, left, right, top, bottom, top left, ...) and a size (small, large), or two shapes
("a red circle left of a green square on a blue background", "... above ..."). The colour **purple** was held
out: `make demo` teaches it with a LoRA.

| part | what | trained |
|---|---|---|
{table}

Training time on a shared 2-core CPU: {sum(times.values()) / 60:.0f} min ({stages}).
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    main()
