"""What the side-by-side benchmark runs: its modes, the model sizes, the inputs and the LoRA every
implementation gets, and the containers that carry one implementation's setup (``Runner``) and the shared
weights and inputs (``Context``). Used by run.py, checkpointing.py and ops.py."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import common

common.add_repo_to_path()

import torch  # noqa: E402
from torch import nn  # noqa: E402

IMPLS = ("diffusmith", "diffusers", "diffsynth")
MODES = {
    # name: (training, dtype, gradient checkpointing: None, "full" (whole blocks) or "selective")
    "train-bf16": (True, torch.bfloat16, None),
    "train-bf16-gc": (True, torch.bfloat16, "full"),
    "train-bf16-sgc": (True, torch.bfloat16, "selective"),
    "train-fp32": (True, torch.float32, None),
    "train-fp32-gc": (True, torch.float32, "full"),
    "train-fp32-sgc": (True, torch.float32, "selective"),
    "train-bf16-compile": (True, torch.bfloat16, None),
    "train-bf16-gc-compile": (True, torch.bfloat16, "full"),
    "train-bf16-sgc-compile": (True, torch.bfloat16, "selective"),
    "infer-bf16": (False, torch.bfloat16, None),
    "infer-fp32": (False, torch.float32, None),
    "infer-bf16-compile": (False, torch.bfloat16, None),
    "infer-bf16-batchcfg": (False, torch.bfloat16, None),
    "train-bf16-cudagraphs": (True, torch.bfloat16, None),
    "infer-bf16-cudagraphs": (False, torch.bfloat16, None),
}
# Selective checkpointing (keep matmul/attention outputs, recompute the elementwise ops) exists in diffusmith
# only: diffusers' enable_gradient_checkpointing and diffsynth's flag recompute whole blocks.
# `-compile`: diffusmith's --compile (torch.compile of each repeated block). Neither peer's trainer compiles;
# diffusers has the same regional compilation (`compile_repeated_blocks`), which runs for it in
# DIFFUSERS_COMPILES; otherwise a peer runs its eager step of the same mode in the rotation,
# so that the compiled step is timed alternating with what the peers' tools run.
# `-cudagraphs` (CUDA only): diffusmith's `--compile-mode reduce-overhead`, each compiled block replayed as a CUDA
# graph; against diffusers' regional compilation in its default mode and DiffSynth's eager step.
CUDA_GRAPHED = {"train-bf16-cudagraphs", "infer-bf16-cudagraphs"}
COMPILED = {mode for mode in MODES if mode.endswith("-compile")} | CUDA_GRAPHED
DIFFUSERS_COMPILES = {"train-bf16-compile", "infer-bf16-compile"} | CUDA_GRAPHED
# `-batchcfg`: diffusmith runs true CFG's two predictions as one batch (`batch_cfg=True`, the default of a
# streamed DiT); the peers have no such option and run their two DiT calls in the same rotation. In these modes
# every implementation's negative prompt is a quarter of the positive's real tokens (a short negative prompt,
# as in use), so the batch pays for padding the negative and masking the padding.
BATCHED_CFG = {"infer-bf16-batchcfg"}


def negative_tokens(size: Size, mode: str) -> int:
    """The negative prompt's real tokens in ``mode``."""
    return max(1, size.text_valid // 4) if mode in BATCHED_CFG else size.text_valid


def compiles(impl: str, mode: str) -> bool:
    """Whether ``impl`` compiles its model in ``mode``."""
    return mode in COMPILED and (impl == "diffusmith" or (impl == "diffusers" and mode in DIFFUSERS_COMPILES))


def compile_mode(impl: str, mode: str) -> str | None:
    """torch.compile's mode for ``impl`` in a compiled ``mode`` (None: torch's default)."""
    return "reduce-overhead" if impl == "diffusmith" and mode in CUDA_GRAPHED else None


def supports(impl: str, mode: str) -> bool:
    """Whether ``impl`` runs in ``mode``: selective checkpointing is diffusmith's only; in a compiled mode a
    peer without compilation runs its eager step."""
    if MODES[mode][2] == "selective":
        return impl == "diffusmith"
    return True
# The same LoRA targets in all three (peft suffix matching; the module names are the checkpoint's in all three):
# attention of both streams, both MLPs, both AdaLN modulations: diffusmith's default list.
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1",
)
CFG_SCALE = 4.0
LR = 1e-4
# Qwen-Image's scheduler_config.json
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                        max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                        time_shift_type="exponential")


@dataclass(frozen=True)
class Size:
    layers: int
    heads: int
    pixels: int
    text_len: int
    text_valid: int
    rank: int
    head_dim: int = 128
    axes: tuple[int, int, int] = (16, 56, 56)
    joint_dim: int = 3584
    batch: int = 1

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def latent(self) -> int:
        return self.pixels // 8

    @property
    def image_tokens(self) -> int:
        return (self.latent // 2) ** 2

    def describe(self, padded_text: bool = False) -> str:
        text = (f"text {self.text_len} tokens ({self.text_valid} real + {self.text_len - self.text_valid} padding, "
                "masked) for diffusmith and diffusers, the real ones only for diffsynth" if padded_text else
                f"text {self.text_valid} real tokens, no padding")
        return (f"{self.layers} layers, {self.heads} heads x {self.head_dim} = width {self.width}, rope axes "
                f"{self.axes}, joint_attention_dim {self.joint_dim}, in 64 / out 16; {self.pixels}x{self.pixels} "
                f"(latents {self.latent}x{self.latent}, {self.image_tokens} image tokens), batch {self.batch}, "
                f"{text}, LoRA rank {self.rank}")


MID = Size(layers=4, heads=6, pixels=512, text_len=128, text_valid=100, rank=16)
SMALL = Size(layers=2, heads=2, pixels=256, text_len=64, text_valid=50, rank=16)
# The mid-size depth with negligible arithmetic (width 128, 16 image tokens, 12 text tokens): a step's time is
# what the framework spends per op (Python, dispatch, autograd), the regime of the mid-size model on a GPU, where
# its kernels take far less time than their launch.
OVERHEAD = Size(layers=4, heads=1, pixels=64, text_len=16, text_valid=12, rank=16, joint_dim=64)
SIZES = {"mid": MID, "small": SMALL, "overhead": OVERHEAD}


@dataclass
class Inputs:
    """The same tensors for every implementation (fp32 masters; each mode casts them)."""

    x0: torch.Tensor  # (B, 16, h, w) clean latents
    emb: torch.Tensor  # (B, T, joint) prompt embeddings
    neg: torch.Tensor  # (B, T, joint) negative prompt embeddings
    mask: torch.Tensor  # (B, T) long, 1 = real token
    noise: torch.Tensor  # (B, 16, h, w) initial noise for inference


@dataclass
class Runner:
    """One implementation set up for one mode: ``step()`` runs one measured step."""

    step: Callable[[], None]
    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    notes: list[str] = field(default_factory=list)

    def resident_bytes(self) -> int:
        """Weights + optimizer state: what is alive before a step starts (gradients are set to None)."""
        return common.module_bytes(self.model) + (common.optimizer_state_bytes(self.optimizer)
                                                  if self.optimizer else 0)

    def grad_bytes(self) -> int:
        if self.optimizer is None:
            return 0
        return sum(p.numel() * p.element_size() for g in self.optimizer.param_groups for p in g["params"])

    def lora_summary(self) -> str:
        params = [p for g in self.optimizer.param_groups for p in g["params"]] if self.optimizer else []
        if not params:
            return "-"
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
        return f"{sum(p.numel() for p in params) / 1e6:.2f}M {'/'.join(dtypes)}"


@dataclass
class Context:
    size: Size
    device: torch.device
    state_dict: dict[str, torch.Tensor]
    inputs: Inputs
    # False: each implementation gets what its own prompt step returns for one prompt (see ``prompt_inputs``);
    # True: the old case, diffusmith and diffusers attend over padded text with a mask.
    padded_text: bool = False
    gc_interval: int = 1  # diffusmith's --gradient-checkpointing-interval in its checkpointed modes

    def autocast(self, dtype: torch.dtype):
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(device=self.device, dtype=dtype if t.is_floating_point() else t.dtype)

    def prompt_inputs(self, impl: str, emb: torch.Tensor, dtype: torch.dtype,
                      tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prompt embeddings, mask or None)`` as ``impl``'s own prompt step gives them for one prompt of
        ``tokens`` (default ``size.text_valid``) real tokens.

        - diffusmith: ``encode_prompt`` keeps the real tokens and returns mask None when all are real (always
          at batch 1; tested in tests/test_text_encoder.py).
        - diffusers: ``QwenImagePipeline.encode_prompt`` pads to the longest prompt of the batch (none at batch
          1) and sets ``prompt_embeds_mask = None`` when the mask is all ones.
        - diffsynth: its prompt unit keeps the real tokens and returns an all-ones mask, which its model call
          reads only for the text length.

        With ``padded_text`` diffusmith and diffusers get all ``size.text_len`` tokens and the padding mask.
        """
        valid = tokens or self.size.text_valid
        mask = self.cast(self.inputs.mask, dtype).clone()
        mask[:, valid:] = 0
        emb = self.cast(emb, dtype)
        if impl == "diffsynth":
            return emb[:, :valid], mask[:, :valid]
        if self.padded_text:
            return emb, mask
        return emb[:, :valid], None


def make_inputs(size: Size, seed: int = 1) -> Inputs:
    """The random latents, noise and prompt embeddings of ``size`` (the same for every implementation)."""
    g = torch.Generator().manual_seed(seed)
    b, h = size.batch, size.latent
    mask = torch.zeros(b, size.text_len, dtype=torch.long)
    mask[:, : size.text_valid] = 1
    return Inputs(
        x0=torch.randn(b, 16, h, h, generator=g),
        emb=torch.randn(b, size.text_len, size.joint_dim, generator=g),
        neg=torch.randn(b, size.text_len, size.joint_dim, generator=g),
        mask=mask,
        noise=torch.randn(b, 16, h, h, generator=g),
    )

