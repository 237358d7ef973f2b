"""Command line: ``diffusmith generate | inspect``. User mistakes end in one line (traceback with --debug)."""

from __future__ import annotations

import argparse
import difflib
import logging
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
        known = [s for a in self._actions for s in a.option_strings]
        typos = [a.split("=")[0] for a in getattr(self, "_seen_args", []) if a.startswith("--")]
        typos = [a for a in typos if a not in known]
        close = difflib.get_close_matches(typos[0], known, n=1) if typos else []
        hint = f"; {typos[0]} is not an option, did you mean {close[0]}?" if close else ""
        self.exit(2, f"{self.prog}: error: {message}{hint} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _strength(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
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
    gen.add_argument("--tiled", action="store_true", help="encode/decode with the VAE in tiles")
    gen.add_argument("--transformer", default=None, help="a loose .safetensors replacing the DiT")
    gen.add_argument("--allow-pickle", action="store_true",
                     help="allow .bin/.pt weights (pickles can run code: only for files you trust)")
    gen.add_argument("-o", "--output", required=True, help="output picture (.png, .jpg, .webp)")
    gen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    ins = sub.add_parser("inspect", help="tell which model a .safetensors file holds", allow_abbrev=False)
    ins.add_argument("file")
    ins.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_generate(args: argparse.Namespace) -> None:
    from .pipelines.qwen_image import QwenImagePipeline

    output = Path(args.output)
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise DiffusmithError(f"output {output} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    overrides = {"transformer": args.transformer} if args.transformer else {}
    pipe = QwenImagePipeline.from_pretrained(args.model, device=args.device, torch_dtype=args.dtype,
                                             offload=args.offload, allow_pickle=args.allow_pickle, **overrides)
    image = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, cfg_scale=args.cfg_scale,
                 input_image=args.input_image, denoising_strength=args.denoising_strength,
                 height=args.height, width=args.width, seed=args.seed, num_inference_steps=args.steps,
                 tiled=args.tiled)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial{output.suffix}")
    image.save(partial)
    partial.replace(output)  # never leave a half-written picture under the final name
    print(f"saved {output} ({image.width}x{image.height})")


def cmd_inspect(args: argparse.Namespace) -> None:
    from .core.loading import read_safetensors_header
    from .core.signatures import identify_file
    from .models.qwen_image import signatures  # noqa: F401  (registers the Qwen-Image signatures)

    match = identify_file(args.file)
    header = read_safetensors_header(args.file)
    params = sum(_numel(shape) for shape, _ in header.values())
    prefix = f", key prefix {match.prefix!r}" if match.prefix else ""
    print(f"{args.file}: {match.describe or match.name} ({len(header)} tensors, {params / 1e9:.2f}B parameters"
          f"{prefix})")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


COMMANDS = {"generate": cmd_generate, "inspect": cmd_inspect}


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
    except KeyboardInterrupt:
        print("diffusmith: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
