"""Ops dispatched in one step of each implementation (run.py's steps, same model and inputs).

    python benchmarks/ops.py [--size overhead|small|mid] [--modes train-bf16 train-fp32 infer-bf16]

An eager step whose kernels are short (a mid-size model on a GPU) costs about one host-side call per op, so the
count says what such a step costs, on any machine. "kernel ops" leaves out views and other ops that launch no
kernel. The peers' AdamW runs with foreach=True, what they get on CUDA (on the CPU torch gives them its
per-parameter loop).
"""

from __future__ import annotations

import argparse
import collections
import sys

import common

common.add_repo_to_path()

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# ops that only make views or metadata: no kernel launch on a GPU
NO_KERNEL = {"t", "view", "_unsafe_view", "unsqueeze", "squeeze", "transpose", "detach", "expand", "permute",
             "split", "split_with_sizes", "unbind", "slice", "select", "as_strided", "alias", "unflatten",
             "view_as_real", "view_as_complex", "_reshape_alias", "chunk"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        return sum(n for op, n in self.counts.items() if op not in NO_KERNEL)


def foreach_adamw() -> None:
    """AdamW without an explicit choice gets foreach=True, as on CUDA (diffusmith asks for fused itself)."""
    init = torch.optim.AdamW.__init__

    def patched(self, *args, **kwargs):
        if not kwargs.get("fused"):
            kwargs.setdefault("foreach", True)
        init(self, *args, **kwargs)

    torch.optim.AdamW.__init__ = patched


def main(argv: list[str] | None = None) -> int:
    import impls
    import workload

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(workload.SIZES), default="overhead")
    parser.add_argument("--modes", nargs="+", default=["train-bf16", "train-fp32", "infer-bf16"],
                        choices=[m for m in workload.MODES if m not in workload.COMPILED])
    parser.add_argument("--impls", nargs="+", default=list(workload.IMPLS), choices=list(workload.IMPLS))
    args = parser.parse_args(argv)
    foreach_adamw()
    size = workload.SIZES[args.size]
    torch.manual_seed(0)
    state_dict = {k: v.detach().clone() for k, v in impls.diffusers_transformer(size).state_dict().items()}
    ctx = workload.Context(size, torch.device("cpu"), state_dict, workload.make_inputs(size), padded_text=False)
    print(f"| mode | {' | '.join(args.impls)} |\n|---|{'---|' * len(args.impls)}")
    for mode in args.modes:
        cells = []
        for name in args.impls:
            runner = impls.BUILDERS[name](ctx, mode)
            for _ in range(2):  # lazily built state (optimizer moments, rope tables) out of the count
                runner.step()
            with OpCounter() as counter:
                runner.step()
            cells.append(f"{sum(counter.counts.values())} ({counter.kernels} kernel ops)")
        print(f"| {mode} | {' | '.join(cells)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
