"""The training LoRA layer against peft's (the reference): the same initial weights for a seed, the same
outputs and gradients, in float32 and under bf16 autocast, and three matrix products per call."""

from __future__ import annotations

import copy

import pytest
import torch
from ops import OpCounter  # benchmarks/ops.py: the ops one step dispatches
from torch import nn

from diffusmith import DiffusmithError
from diffusmith.core.lora import inject_lora, lora_state_dict
from diffusmith.core.lora_layer import LoraLinear

peft = pytest.importorskip("peft")

IN, OUT, RANK, ALPHA = 24, 40, 4, 12.0  # alpha != rank: scale 3


def peft_layer(base: nn.Linear, rank: int = RANK, alpha: float = ALPHA) -> nn.Module:
    holder = nn.Sequential(copy.deepcopy(base))
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0)
    peft.inject_adapter_in_model(config, holder)
    return holder[0]


def pair(seed: int = 0) -> tuple[nn.Module, LoraLinear]:
    """peft's layer and ours on the same base, with the same random (as if trained) LoRA weights."""
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT).requires_grad_(False)
    reference, ours = peft_layer(base), LoraLinear(copy.deepcopy(base), RANK, ALPHA)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            weight = getattr(reference, name)["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=g) * 0.3)
            getattr(ours, name)["default"].weight.copy_(weight)
    return reference, ours


def outputs_and_grads(layer: nn.Module, x: torch.Tensor, autocast: bool = False,
                      x_grad: bool = True) -> dict[str, torch.Tensor]:
    """The output and the gradients that exist (x's with ``x_grad``, and the trainable LoRA weights')."""
    x = x.detach().clone().requires_grad_(x_grad)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.float().square().sum().backward()
    grads = {"x": x.grad, "down": layer.lora_A["default"].weight.grad, "up": layer.lora_B["default"].weight.grad}
    return {"y": y.detach().float(), **{name: g.float() for name, g in grads.items() if g is not None}}


def test_initial_weights_are_peft_s_for_the_same_seed():
    base = nn.Linear(IN, OUT)
    torch.manual_seed(7)
    reference = peft_layer(base)
    torch.manual_seed(7)
    ours = LoraLinear(copy.deepcopy(base), RANK, ALPHA)
    assert torch.equal(ours.down, reference.lora_A["default"].weight)
    assert torch.equal(ours.up, torch.zeros(OUT, RANK))
    x = torch.randn(3, IN)
    assert torch.equal(ours(x), base(x))  # a zero update leaves the base's output bit for bit
    assert ours.alpha == ALPHA and ours.scale == ALPHA / RANK


@pytest.mark.parametrize("shape", [(2, 5, IN), (7, IN), (IN,)])
def test_float32_outputs_and_gradients_match_peft(shape):
    reference, ours = pair()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    expected, got = outputs_and_grads(reference, x), outputs_and_grads(ours, x)
    assert got["y"].shape == expected["y"].shape
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5, msg=key)


def check_bf16_autocast_against_peft(device: str) -> None:
    reference, ours = (layer.to(device) for layer in pair())
    x = torch.randn(2, 64, IN, generator=torch.Generator().manual_seed(4)).bfloat16().to(device)
    exact = outputs_and_grads(copy.deepcopy(ours), x.float())
    for layer in (reference, ours):
        layer.base_layer.to(torch.bfloat16)
    expected, got = outputs_and_grads(reference, x, autocast=True), outputs_and_grads(ours, x, autocast=True)
    assert got["y"].dtype == expected["y"].dtype and ours.lora_A["default"].weight.grad.dtype == torch.float32
    for key in expected:
        scale = expected[key].abs().max()
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0.02 * scale, msg=key)
    assert (got["y"] - exact["y"]).abs().mean() <= (expected["y"] - exact["y"]).abs().mean() * 1.05


def test_bf16_autocast_matches_peft_within_its_rounding():
    """bf16 base, float32 LoRA, autocast: as a trainer runs it. The sum is rounded once (inside the product)
    instead of twice, so ours is at least as close to the float32 result as peft's."""
    check_bf16_autocast_against_peft("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_matches_peft_on_cuda():
    check_bf16_autocast_against_peft("cuda")


def test_outside_autocast_a_half_base_runs_the_lora_in_float32():
    _, ours = pair()
    ours.base_layer.to(torch.bfloat16)
    x = torch.randn(4, IN).bfloat16()
    y = ours(x)
    assert y.dtype == torch.bfloat16
    low_rank = x.float() @ ours.down.detach().T @ ours.up.detach().T * ours.scale
    torch.testing.assert_close(y, (ours.base_layer(x) + low_rank.bfloat16()), rtol=0, atol=0)


@pytest.mark.parametrize("call", ["training", "inference"])
def test_a_call_runs_three_products_and_no_pass_over_the_output(call):
    """The LoRA's up-projection is summed into the base output in place (``addmm_``): no scale, no add, and no
    copy of the base output into a new tensor, which an out-of-place ``addmm`` makes first."""
    reference, ours = pair()
    x = torch.randn(2, 5, IN)
    counts = {}
    for name, layer in (("peft", reference), ("ours", ours)):
        with OpCounter() as counter, torch.set_grad_enabled(call == "training"):
            y = layer(x)
        counts[name] = counter.counts
        if name == "ours":
            torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-6)
    assert counts["ours"]["addmm"] + counts["ours"]["mm"] + counts["ours"]["addmm_"] == 3
    assert counts["ours"]["addmm_"] == 1  # the sum, in place
    assert not {"mul", "add", "_to_copy"} & set(counts["ours"])
    assert counts["peft"]["mul"] == 1 and counts["peft"]["add"] == 1  # the control: what the fused sum saves


def test_a_base_output_a_hook_may_hold_is_not_summed_into():
    """A forward hook of the base sees (and may keep) its output: the sum then goes to a new tensor."""
    reference, ours = pair()
    kept = []
    ours.base_layer.register_forward_hook(lambda module, args, out: kept.append((out, out.clone())))
    x = torch.randn(2, 5, IN)
    with torch.no_grad():
        y = ours(x)
    out, value = kept[0]
    torch.testing.assert_close(out, value, rtol=0, atol=0)  # what the hook holds is still the base's output
    torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-6)


def test_backward_adds_the_input_gradients_inside_a_product():
    """A training call of a plain Linear base is one autograd Function: x's gradient through the frozen
    product and through the down-projection are summed by an in-place addmm, not by an add (peft's control)."""
    reference, ours = pair()
    counts = {}
    for name, layer in (("peft", reference), ("ours", ours)):
        x = torch.randn(2, 5, IN, requires_grad=True)
        y = layer(x)
        with OpCounter() as counter:
            y.backward(torch.ones_like(y))
        counts[name] = counter.counts
    assert counts["ours"]["addmm_"] == 1 and "add" not in counts["ours"]
    assert counts["ours"]["mm"] == 4  # up's and down's gradients, the hidden gradient, the frozen product's
    assert counts["peft"]["add"] >= 1


@pytest.mark.parametrize("call", ["training", "inference"])
def test_under_compile_the_sums_are_adds_the_compiler_can_fuse(call):
    """Traced by torch.compile, the layer writes its sums (the low-rank product into the base output, and in
    training backward's two input gradients) as ``mm`` + ``add``: on a GPU inductor then fuses the add into the
    next elementwise kernel. An ``addmm`` into a full matrix would stay an extern product that first copies that
    matrix (and an in-place ``addmm_`` is functionalised into one). Same values and gradients as eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(graph, example_inputs):
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    _, ours = pair()
    x = torch.randn(2, 5, IN)
    training = call == "training"
    with torch.set_grad_enabled(training):
        eager = outputs_and_grads(ours, x) if training else {"y": ours(x)}
        ours.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        compiled = torch.compile(ours, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture),
                                 fullgraph=True)
        got = outputs_and_grads(compiled, x) if training else {"y": compiled(x)}
        torch._dynamo.reset()
    for name, value in eager.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)  # fp32 sums in another order
    assert len(graphs) == (2 if training else 1)  # forward (and backward)
    for graph in graphs:
        ops = [node.target for node in graph.graph.nodes if node.op == "call_function"]
        full_addmm = [node for node in graph.graph.nodes if node.target in (torch.ops.aten.addmm.default,
                                                                            torch.ops.aten.addmm_.default)
                      and node.args[0].meta["val"].dim() == 2]
        assert not full_addmm, graph.code
        assert torch.ops.aten.add.Tensor in ops, graph.code


@pytest.mark.parametrize("trainable", [{"x"}, {"down", "up"}, {"x", "down", "up"}, {"down"}, {"up"}],
                         ids=["x", "lora", "x+lora", "down", "up"])
def test_gradients_match_peft_whichever_inputs_train(trainable):
    reference, ours = pair()
    for layer in (reference, ours):
        layer.lora_A["default"].weight.requires_grad_("down" in trainable)
        layer.lora_B["default"].weight.requires_grad_("up" in trainable)
    x = torch.randn(3, 4, IN, generator=torch.Generator().manual_seed(5))
    x_grad = "x" in trainable
    expected, got = outputs_and_grads(reference, x, x_grad=x_grad), outputs_and_grads(ours, x, x_grad=x_grad)
    assert expected.keys() == got.keys() == {"y", *trainable}
    assert_close_to_float32_rounding(got, expected)


def assert_close_to_float32_rounding(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name in expected:
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_a_hooked_base_runs_through_its_own_forward():
    """A base with hooks (offload streams weights in a pre-hook) is called as a module, so its hooks run."""
    reference, ours = pair()
    calls = []
    ours.base_layer.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    x = torch.randn(2, 5, IN, requires_grad=True)
    expected, got = outputs_and_grads(reference, x), outputs_and_grads(ours, x)
    assert calls
    assert_close_to_float32_rounding(got, expected)


def test_inject_lora_uses_these_layers_with_peft_s_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, IN))
    names = inject_lora(model, ["0", "2"], rank=RANK, alpha=ALPHA)
    assert names == ["0", "2"] and all(isinstance(model[int(n)], LoraLinear) for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{ab}.default.weight" for n in names for ab in "AB"}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {
        f"{n}.base_layer.{w}" for n in names for w in ("weight", "bias")}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert {n: p.alpha for n, p in lora_state_dict(model).items()} == {"0": ALPHA, "2": ALPHA}


def test_inject_lora_twice_or_with_a_bad_rank_is_a_one_line_error():
    model = nn.Sequential(nn.Linear(IN, OUT))
    for rank in (0, 1.5, True):
        with pytest.raises(DiffusmithError, match="rank"):
            inject_lora(model, ["0"], rank=rank)
    inject_lora(model, ["0"], rank=RANK)
    with pytest.raises(DiffusmithError, match="already has LoRA layers") as info:
        inject_lora(model, ["0"], rank=RANK)
    assert "\n" not in str(info.value)


def test_training_a_dit_gives_peft_s_weights():
    """The tiny DiT trained for three AdamW steps from the same seed with our layers and with peft's (float32):
    the same LoRA weights up to float32 rounding. The scale folded into the product and the sum taken inside it
    round differently from peft's separate passes; Adam turns that into at most 2e-6 here (weights ~0.18), where a
    wrong scale or a missing term would move weights by the learning rate (1e-2) per step."""
    from diffusmith.core.lora import find_lora_targets
    from diffusmith.models.qwen_image.dit import PRESETS, QwenImageDiT

    torch.manual_seed(0)
    base = QwenImageDiT(PRESETS["tiny"])
    g = torch.Generator().manual_seed(1)
    steps = [(torch.randn(1, 16, 8, 8, generator=g), torch.tensor([300.0 + 200 * i]),
              torch.randn(1, 5, 32, generator=g), torch.randn(1, 16, 8, 8, generator=g)) for i in range(3)]

    def trained(inject) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(base)
        torch.manual_seed(2)
        inject(model)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
        for latents, t, text, target in steps:
            torch.nn.functional.mse_loss(model(latents, t, text), target).backward()
            optimizer.step()
            optimizer.zero_grad()
        return {n: p.detach() for n, p in params.items()}

    def with_peft(model):
        names = find_lora_targets(model, QwenImageDiT.default_lora_targets, model.modules_without_gradient())
        peft.inject_adapter_in_model(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=names), model)

    expected = trained(with_peft)
    got = trained(lambda m: inject_lora(m, QwenImageDiT.default_lora_targets, rank=RANK, alpha=ALPHA,
                                        exclude=m.modules_without_gradient()))
    assert got.keys() == expected.keys() and len(got) > 0
    assert any(not torch.equal(w, torch.zeros_like(w)) for n, w in got.items() if "lora_B" in n)  # it trained
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5, msg=name)
