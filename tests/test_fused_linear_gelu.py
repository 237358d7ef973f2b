"""The MLP's first projection and its tanh GELU run as one oneDNN kernel on the CPU outside autograd.

The fused kernel must give the reference's function (diffusers: ``Linear`` then ``F.gelu(approximate="tanh")``)
and be used only where it is safe: never under autograd (GELU's backward needs the product), a FLOP counter
(which must see the product) or for a module that is not a plain ``nn.Linear``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffusmith.core.lora_layer import LoraLinear
from diffusmith.models import layers
from diffusmith.models.layers import GeluProjection

pytestmark = pytest.mark.skipif(not layers._onednn_linear_dtypes(), reason="this torch has no oneDNN linear")


def _module(dtype: torch.dtype) -> GeluProjection:
    torch.manual_seed(0)
    return GeluProjection(64, 256).to(dtype)


def _exact(module: GeluProjection, x: torch.Tensor) -> torch.Tensor:
    """The reference's function in float64 from the same (rounded) inputs and weights."""
    p = module.proj
    return F.gelu(F.linear(x.double(), p.weight.double(), p.bias.double()), approximate="tanh")


def _ran_fused(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.name == "mkldnn::_linear_pointwise" for e in prof.events())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projection_is_the_references_function(dtype):
    module = _module(dtype)
    x = torch.randn(2, 37, 64).to(dtype)
    with torch.no_grad():
        assert _ran_fused(lambda: module(x))
        fused = module(x)
        unfused = F.gelu(module.proj(x), approximate="tanh")
    assert fused.dtype == dtype and fused.shape == (2, 37, 256)
    exact = _exact(module, x)
    # fp32: both within a few ulps of the exact value; bf16: the fused kernel skips the product's rounding,
    # so it is at least as close to the exact value as the unfused pair, which rounds twice
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert (fused.double() - exact).abs().max() <= tol
    assert (fused.double() - exact).abs().max() <= (unfused.double() - exact).abs().max() + 1e-6
    if dtype == torch.float32:  # the tolerance tells the GELUs apart: the erf form is ~1e-4 off the tanh form
        assert (F.gelu(module.proj(x).double()) - exact).abs().max() > 4 * tol


def test_autograd_takes_the_unfused_path_and_its_gradients():
    module = _module(torch.float32)
    x = torch.randn(1, 9, 64, requires_grad=True)
    assert not _ran_fused(lambda: module(x))
    module(x).square().sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    F.gelu(F.linear(ref_x, module.proj.weight, module.proj.bias), approximate="tanh").square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)


def test_a_flop_counter_sees_the_product():
    module = _module(torch.float32)
    x = torch.randn(1, 9, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    assert counter.get_total_flops() == 2 * 9 * 64 * 256


def test_a_hooked_projection_is_not_fused():
    module = _module(torch.float32)
    x = torch.randn(1, 9, 64)
    calls = []
    module.proj.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        assert not _ran_fused(lambda: module(x))
    assert calls  # the hook ran: the module's own forward was called


def test_a_lora_wrapped_projection_is_not_fused_and_keeps_its_low_rank_term():
    module = _module(torch.float32)
    x = torch.randn(1, 9, 64)
    base = module.proj
    module.proj = LoraLinear(base, rank=4, alpha=4)
    with torch.no_grad():
        module.proj.up.normal_()  # a non-zero update, which the fused kernel would leave out
        assert not _ran_fused(lambda: module(x))
        out = module(x)
        delta = F.linear(F.linear(x, module.proj.down), module.proj.up) * module.proj.scale
        expected = F.gelu(base(x) + delta, approximate="tanh")
    torch.testing.assert_close(out, expected)
