"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from diffusmith.errors import DiffusmithError
from diffusmith.training.optim import lr_factor, make_optimizer


def test_adamw_is_fused_and_steps_like_the_plain_one():
    torch.manual_seed(0)
    weights = [torch.randn(16, 64), torch.randn(64, 16)]
    grads = [torch.randn_like(w) for w in weights]
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = make_optimizer(params, 1e-2) if fused else torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)
        assert optimizer.defaults["fused"] is (True if fused else None)
        for _ in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        results.append(params)
    assert max((a - b).abs().max().item() for a, b in zip(*results, strict=True)) <= 1e-6


def test_optimizer_mistakes():
    with pytest.raises(DiffusmithError, match="nothing to train"):
        make_optimizer([], 1e-4)
    with pytest.raises(DiffusmithError, match="positive number"):
        make_optimizer([torch.nn.Parameter(torch.ones(1))], 0.0)


def test_lr_factor_warms_up_then_decays_along_a_cosine():
    assert [lr_factor(s, schedule="constant", warmup_steps=3, total_steps=10) for s in range(5)] == [
        0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = [lr_factor(s, schedule="cosine", warmup_steps=0, total_steps=4) for s in range(5)]
    assert cosine == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2,
                                    0.0])
