"""Command line: ``diffusmith generate | train | cache | inspect``. User mistakes end in one line (traceback with
--debug)."""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import DiffusmithError

logger = logging.getLogger("diffusmith")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes in one line and suggests the closest flag for a typo."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._seen_args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        known = _known_options(self)
        typos = [a.split("=")[0] for a in getattr(self, "_seen_args", []) if a.startswith("--")]
        typos = [a for a in typos if a not in known]
        close = difflib.get_close_matches(typos[0], known, n=1) if typos else []
        hint = f"; {typos[0]} is not an option, did you mean {close[0]}?" if close else ""
        self.exit(2, f"{self.prog}: error: {message}{hint} (see {self.prog} --help)\n")


def _known_options(parser: argparse.ArgumentParser) -> list[str]:
    """Option strings of a parser and of its subcommands (unknown arguments surface at the top level)."""
    known = []
    for action in parser._actions:
        known += action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                known += _known_options(sub)
    return list(dict.fromkeys(known))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _strength(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusmith", description=__doc__, allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate a picture", allow_abbrev=False)
    gen.add_argument("--model", required=True, help="folder in the official layout, or a hub repo id")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--cfg-scale", type=float, default=4.0, help="true CFG scale; 1 turns CFG off")
    gen.add_argument("--height", type=_positive_int, default=None)
    gen.add_argument("--width", type=_positive_int, default=None)
    gen.add_argument("--steps", type=_positive_int, default=30)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--input-image", default=None, help="start from this picture (image-to-image)")
    gen.add_argument("--denoising-strength", type=_strength, default=1.0)
    gen.add_argument("--device", default="cuda" if _cuda() else "cpu")
    gen.add_argument("--dtype", default="bf16" if _cuda() else "fp32", help="bf16, fp16 or fp32")
    gen.add_argument("--offload", default="none", choices=["none", "model", "sequential"])
    gen.add_argument("--block-swap", type=_non_negative_int, default=None, metavar="N",
                     help="keep the DiT's last N blocks on the GPU and stream the others from CPU memory, each "
                          "copied while the one before it computes (implies --offload sequential)")
    gen.add_argument("--fp8", action="store_true",
                     help="store the DiT's block weights in float8 (half the GPU memory of bf16, fp8 rounding)")
    gen.add_argument("--batch-cfg", action=argparse.BooleanOptionalAction, default=None,
                     help="run true CFG's two predictions as one batch (default: with --offload sequential or "
                          "--block-swap, where it halves the weights streamed per step)")
    gen.add_argument("--tiled", action="store_true", help="encode/decode with the VAE in tiles")
    _add_compile(gen)
    _add_attention_backend(gen)
    gen.add_argument("--transformer", default=None, help="a loose .safetensors replacing the DiT")
    gen.add_argument("--lora", action="extend", nargs="+", default=[], metavar="PATH",
                     help="merge this LoRA (diffusers, ComfyUI, kohya or peft keys) into the DiT; several: "
                          "--lora A B or --lora A --lora B")
    gen.add_argument("--lora-scale", action="extend", nargs="+", type=_finite, default=[], metavar="S",
                     help="strength of each --lora in order, or one value for all (default 1)")
    gen.add_argument("--allow-pickle", action="store_true",
                     help="allow .bin/.pt weights (pickles can run code: only for files you trust)")
    gen.add_argument("-o", "--output", required=True, help="output picture (.png, .jpg, .webp)")
    gen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    add_train_parser(sub)
    add_train_parser(sub, "cache")

    ins = sub.add_parser("inspect", help="tell which model (or LoRA) a .safetensors file holds", allow_abbrev=False)
    ins.add_argument("file")
    ins.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _add_compile(group) -> None:
    from .core.compilation import COMPILE_MODES

    group.add_argument("--compile", action="store_true",
                       help="torch.compile each transformer block (faster steps after slow first ones)")
    group.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                       help="torch.compile's mode (implies --compile); reduce-overhead also replays each block as "
                            "a CUDA graph, for steps bound by kernel launches (needs the model on the GPU)")


def _add_attention_backend(group) -> None:
    from .core.attention import ATTENTION_BACKENDS

    group.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                       help="attention kernel: auto (torch's choice), or cudnn / flash / efficient first where "
                            "the GPU and inputs allow it, or math (the plain reference)")


def _probability(text: str) -> float:
    value = _finite(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def add_train_parser(sub, name: str = "train") -> None:
    if name == "train":
        tr = sub.add_parser("train", help="fine-tune (LoRA or full) on a dataset", allow_abbrev=False)
        tr.add_argument("--output", required=True,
                        help="run folder: lora.safetensors, checkpoints/, samples/, logs/")
        tr.add_argument("--cache", default=None,
                        help="train from a feature cache made by `diffusmith cache` (no VAE/text encoder)")
    else:
        tr = sub.add_parser("cache", allow_abbrev=False,
                            help="compute the frozen part (VAE latents, prompt embeddings) once, for train --cache")
        tr.add_argument("--output", required=True, help="the cache folder to create")
    tr.add_argument("--model", required=True, help="folder in the official layout, or a hub repo id")
    tr.add_argument("--dataset", required=True,
                    help="folder of images + .txt captions, or a metadata.csv / metadata.jsonl")
    what = tr.add_argument_group("what trains")
    what.add_argument("--full", action="store_true", help="full fine-tuning instead of a LoRA")
    what.add_argument("--lora-rank", type=_positive_int, default=16)
    what.add_argument("--lora-alpha", type=_finite, default=None, help="default: the rank (scale 1)")
    what.add_argument("--lora-targets", default="default",
                      help="'default' (attention, MLP and modulation linears) or a comma-separated list")
    data = tr.add_argument_group("data")
    data.add_argument("--height", type=_positive_int, default=None)
    data.add_argument("--width", type=_positive_int, default=None)
    data.add_argument("--max-pixels", type=_positive_int, default=None,
                      help="keep each image's aspect ratio within this many pixels (buckets)")
    data.add_argument("--batch-size", type=_positive_int, default=1)
    data.add_argument("--caption-dropout", type=_probability, default=0.0)
    data.add_argument("--repeat", type=_positive_int, default=1, help="times each image is seen per epoch")
    data.add_argument("--skip-bad-samples", action="store_true",
                      help="drop unreadable/missing images (with a count) instead of stopping")
    data.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    opt = tr.add_argument_group("optimisation")
    opt.add_argument("--learning-rate", type=_finite, default=1e-4)
    opt.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    opt.add_argument("--warmup-steps", type=int, default=0)
    opt.add_argument("--max-steps", type=_positive_int, default=None)
    opt.add_argument("--epochs", type=_positive_int, default=None)
    opt.add_argument("--gradient-accumulation", type=_positive_int, default=1)
    opt.add_argument("--max-grad-norm", type=_finite, default=1.0, help="gradient clipping; 0 turns it off")
    opt.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    opt.add_argument("--timestep-sampling", default="shifted", choices=["shifted", "logit_normal", "fixed_shift"])
    opt.add_argument("--timestep-mu", type=_finite, default=None,
                     help="fixed shift mu for --timestep-sampling shifted (default: from the resolution)")
    opt.add_argument("--loss-weighting", default="none", choices=["none", "bell"])
    run = tr.add_argument_group("run")
    run.add_argument("--save-every", type=_positive_int, default=None, help="checkpoint every N steps")
    run.add_argument("--keep-checkpoints", type=_positive_int, default=None, help="keep only the last N")
    run.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    run.add_argument("--gradient-checkpointing", action="store_true")
    run.add_argument("--gradient-checkpointing-offload", action="store_true",
                     help="checkpointing that also keeps the saved activations in CPU memory")
    run.add_argument("--gradient-checkpointing-mode", default="full", choices=["full", "selective"],
                     help="full: recompute whole blocks in backward (least memory); selective: keep the attention "
                          "and matrix-product outputs, recompute only the cheap ops (faster, more memory)")
    run.add_argument("--gradient-checkpointing-interval", type=_positive_int, default=1, metavar="N",
                     help="checkpoint only every N-th block (2: half of them): faster, more memory")
    if name == "train":
        run.add_argument("--block-swap", type=_non_negative_int, default=None, metavar="N",
                         help="keep the frozen weights of only the last N transformer blocks on the GPU; the "
                              "others wait in CPU memory and are copied in one block at a time (LoRA only)")
        run.add_argument("--fp8-base", action="store_true",
                         help="store the frozen transformer-block weights in fp8 (half of bf16), upcast one "
                              "layer at a time (LoRA only)")
        _add_compile(run)
    _add_attention_backend(run)
    run.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    run.add_argument("--num-processes", type=_positive_int, default=1,
                     help="data-parallel processes (relaunches through accelerate)")
    if name == "train":
        run.add_argument("--sharding", default="none", choices=["none", "fsdp", "deepspeed-zero1", "deepspeed-zero2"],
                         help="split weights/gradients/optimizer state over the processes: fsdp (torch FSDP2) "
                              "or DeepSpeed ZeRO stage 1/2 (pip install deepspeed); none = plain data parallel")
    run.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt model weights")
    val = tr.add_argument_group("validation")
    val.add_argument("--validation-prompt", action="append", default=[], metavar="PROMPT")
    val.add_argument("--validate-every", type=_positive_int, default=None)
    val.add_argument("--validation-steps", type=_positive_int, default=20)
    val.add_argument("--validation-cfg-scale", type=_finite, default=4.0)
    tr.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _train_config(args: argparse.Namespace):
    from .training.runner import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__)
    options = {k: v for k, v in vars(args).items() if k in fields}
    options["lora_targets"] = None if args.lora_targets == "default" else [
        t.strip() for t in args.lora_targets.split(",") if t.strip()]
    options["validation_prompts"] = tuple(args.validation_prompt)
    if args.command == "cache":  # the cache accepts train's flags; the ones about steps do not matter
        options.update(max_steps=options.get("max_steps") or 1, epochs=None)
    return TrainConfig(**options)


def cmd_cache(args: argparse.Namespace) -> None:
    from .training.runner import cache_features

    config = _train_config(args)
    print(f"saved {cache_features(config, args.output)}")


def cmd_train(args: argparse.Namespace) -> None:
    if args.num_processes > 1:
        return _relaunch_with_accelerate(args)
    from .training.distributed import end_process_group
    from .training.runner import train

    final = train(_train_config(args))
    # the process is the command's own, so nothing else uses its group; not closed on an error, where a peer
    # may still be inside a collective and NCCL's teardown would wait for it
    end_process_group()
    if os.environ.get("RANK", "0") == "0":  # one line, not one per data-parallel process
        print(f"saved {final}")


def _relaunch_with_accelerate(args: argparse.Namespace) -> None:
    """``--num-processes N``: the same command under ``accelerate launch`` (data parallel)."""
    import subprocess

    argv = sys.argv[1:]
    cleaned, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--num-processes":
            skip = True
            continue
        if not a.startswith("--num-processes="):
            cleaned.append(a)
    # accelerate's --multi_gpu is its data-parallel launcher; without CUDA the processes use gloo on the CPU
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
              "--num_processes", str(args.num_processes), "--mixed_precision", args.mixed_precision,
              "--dynamo_backend", "no"]
    result = subprocess.run([*launch, "-m", "diffusmith", *cleaned], check=False)
    if result.returncode:
        raise SystemExit(result.returncode)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_generate(args: argparse.Namespace) -> None:
    from .core.attention import set_attention_backend
    from .pipelines.qwen_image import QwenImagePipeline

    output = Path(args.output)
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise DiffusmithError(f"output {output} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    lora_scales = _lora_scales(args.lora, args.lora_scale)
    set_attention_backend(args.attention_backend)
    overrides = {"transformer": args.transformer} if args.transformer else {}
    pipe = QwenImagePipeline.from_pretrained(args.model, device=args.device, torch_dtype=args.dtype,
                                             offload=args.offload, allow_pickle=args.allow_pickle,
                                             block_swap=args.block_swap, fp8=args.fp8, **overrides)
    for path, scale in zip(args.lora, lora_scales, strict=True):
        pipe.load_lora(path, scale=scale, allow_pickle=args.allow_pickle)
    if args.compile or args.compile_mode:
        pipe.compile(mode=args.compile_mode)
    image = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, cfg_scale=args.cfg_scale,
                 input_image=args.input_image, denoising_strength=args.denoising_strength,
                 height=args.height, width=args.width, seed=args.seed, num_inference_steps=args.steps,
                 tiled=args.tiled, batch_cfg=args.batch_cfg)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial{output.suffix}")
    image.save(partial)
    partial.replace(output)  # never leave a half-written picture under the final name
    print(f"saved {output} ({image.width}x{image.height})")


def _lora_scales(loras: list[str], scales: list[float]) -> list[float]:
    """One scale per --lora: as given, one for all, or 1."""
    if scales and not loras:
        raise DiffusmithError("--lora-scale was given without --lora; add --lora PATH")
    if len(scales) not in (0, 1, len(loras)):
        raise DiffusmithError(f"{len(scales)} --lora-scale values for {len(loras)} --lora files: give one per "
                              "--lora, or one for all")
    if len(scales) == len(loras):
        return list(scales)
    return [scales[0] if scales else 1.0] * len(loras)


def cmd_inspect(args: argparse.Namespace) -> None:
    from .core.loading import read_safetensors_header
    from .core.lora_info import describe_lora_header
    from .core.signatures import identify_file
    from .models.qwen_image import signatures  # noqa: F401  (registers the Qwen-Image signatures)

    if Path(args.file).is_dir():
        from .training.cache import INDEX, FeatureCache

        if (Path(args.file) / INDEX).exists():
            print(f"{args.file}: {FeatureCache(args.file).describe()}")
            return
    header = read_safetensors_header(args.file)
    lora = describe_lora_header(header)
    if lora is not None:
        print(f"{args.file}: {lora}")
        return
    match = identify_file(args.file)
    params = sum(math.prod(shape) for shape, _ in header.values())
    prefix = f", key prefix {match.prefix!r}" if match.prefix else ""
    print(f"{args.file}: {match.describe or match.name} ({len(header)} tensors, {params / 1e9:.2f}B parameters"
          f"{prefix})")


COMMANDS = {"generate": cmd_generate, "train": cmd_train, "cache": cmd_cache, "inspect": cmd_inspect}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    try:
        COMMANDS[args.command](args)
    except DiffusmithError as e:
        if args.debug:
            raise
        print(f"diffusmith: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"diffusmith: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
