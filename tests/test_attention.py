"""The attention kernel choice (`set_attention_backend`, `--attention-backend`): every backend computes softmax
attention, the choice reaches torch's dispatcher, and bad names are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import BASE
from test_training import config, make_dataset
from torch.utils.flop_counter import FlopCounterMode

import diffusmith.core.attention as attention_module
from diffusmith import DiffusmithError, set_attention_backend
from diffusmith.cli import main
from diffusmith.core.attention import ATTENTION_BACKENDS, attention, attention_backend

B, H, LQ, LK, D = 2, 3, 5, 7, 16


@pytest.fixture(autouse=True)
def auto_afterwards():
    yield
    set_attention_backend("auto")


def inputs(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (LQ, LK, LK))
    mask = torch.ones(B, LK, dtype=torch.bool)
    mask[1, 4:] = False  # the second sample's last keys are padding
    return [t.to(device, dtype).requires_grad_(t.dtype.is_floating_point) for t in (q, k, v)], mask.to(device)


def reference(q, k, v, mask):
    """softmax(q k^T / sqrt(D) + mask) v in float64."""
    scores = q.double() @ k.double().transpose(-1, -2) / D**0.5  # (B, H, LQ, LK)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v.double()


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_every_backend_computes_softmax_attention(backend, masked):
    (q, k, v), mask = inputs()
    mask = mask if masked else None
    set_attention_backend(backend)
    assert attention_backend() == backend
    out = attention(q, k, v, mask)
    expected = reference(q, k, v, mask)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5)


def test_the_choice_reaches_torchs_dispatcher():
    """torch's FLOP counter sees the plain products of the math path (QK^T and PV) but not the CPU's fused
    kernel: which of the two ran shows in the count."""
    (q, k, v), _ = inputs()

    def counted() -> int:
        with FlopCounterMode(display=False) as counter:
            attention(q, k, v)
        return counter.get_total_flops()

    assert counted() == 0  # auto: torch's fused CPU kernel
    set_attention_backend("math")
    assert counted() == 2 * (2 * B * H * LQ * LK * D)
    set_attention_backend("auto")
    assert counted() == 0


def test_an_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(DiffusmithError, match="use one of auto, cudnn, flash, efficient, math"):
        set_attention_backend("sage")
    assert attention_backend() == "auto"
    with pytest.raises(DiffusmithError, match="unknown --attention-backend 'xformers'"):
        config("m", "d", "o", attention_backend="xformers").check()


def test_generate_flag_sets_the_backend_and_keeps_the_picture(tiny_qwen, tmp_path, monkeypatch):
    seen = []
    set_backend = attention_module.set_attention_backend
    monkeypatch.setattr(attention_module, "set_attention_backend", lambda name: seen.append(name) or set_backend(name))
    folder, _ = tiny_qwen
    plain, math = tmp_path / "plain.png", tmp_path / "math.png"
    assert main([*BASE, "--model", str(folder), "-o", str(plain)]) == 0
    assert main([*BASE, "--model", str(folder), "--attention-backend", "math", "-o", str(math)]) == 0
    assert seen == ["auto", "math"]
    diff = np.abs(np.asarray(Image.open(plain), dtype=np.int16) - np.asarray(Image.open(math), dtype=np.int16))
    assert diff.max() <= 1


def test_bad_generate_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", "x", "--prompt", "p", "--attention-backend", "sage", "-o", "o.png"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "invalid choice: 'sage'" in err and err.count("\n") == 1


def test_train_flag_sets_the_backend(tiny_qwen, tmp_path, monkeypatch):
    import diffusmith.training.runner as runner

    seen = []
    monkeypatch.setattr(runner, "set_attention_backend", lambda name: seen.append(name) or set_attention_backend(name))
    data = make_dataset(tmp_path / "data", names=("red",))
    argv = ["train", "--model", str(tiny_qwen[0]), "--dataset", str(data), "--output", str(tmp_path / "run"),
            "--height", "64", "--width", "64", "--device", "cpu", "--lora-rank", "4", "--max-steps", "1"]
    assert main([*argv, "--attention-backend", "math"]) == 0
    assert seen == ["math"] and attention_backend() == "math"


def test_a_chosen_backend_compiles_without_graph_breaks():
    """--compile with --attention-backend: the kernel choice is traced into each block's graph (fullgraph)."""
    from test_memory import lora_dit, loss_and_grads, max_diff

    from diffusmith.core.memory import compile_repeated_blocks

    set_attention_backend("flash")  # a priority list of kernels, as every choice but auto and math
    loss_ref, grads_ref = loss_and_grads(lora_dit(), False)
    model = lora_dit()
    compile_repeated_blocks(model, backend="eager", fullgraph=True)
    loss, grads = loss_and_grads(model, False)
    assert loss == pytest.approx(loss_ref, abs=1e-6) and max_diff(grads, grads_ref) <= 1e-6
