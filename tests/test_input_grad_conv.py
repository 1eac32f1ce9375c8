"""InputGradConv2d: nn.Conv2d with a fast CPU input gradient (the layer behind a transformer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stnkit.models.classifiers import classifier
from stnkit.modules import InputGradConv2d, input_grad_conv2d
from stnkit.modules import conv as conv_module

CASES = [  # (in_channels, kernel, stride, padding, bias)
    (1, (9, 9), 1, 0, True),
    (3, (3, 5), 2, (1, 2), False),
    (4, (3, 3), 1, 1, True),
    (1, (5, 3), 2, (2, 1), True),  # one channel: the weight gradient's own path, with stride and padding
    (1, (4, 4), 3, 0, False),  # a stride whose dilated weight-gradient output overhangs the kernel
]


@pytest.mark.parametrize("in_channels,kernel,stride,padding,bias", CASES)
def test_gradcheck_float64(in_channels, kernel, stride, padding, bias):
    torch.manual_seed(0)
    x = torch.rand(2, in_channels, 13, 12, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, in_channels, *kernel, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)

    def function(*args):
        return input_grad_conv2d(args[0], args[1], args[2] if bias else None, stride, padding)

    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)


@pytest.mark.parametrize("in_channels,kernel,stride,padding,bias", CASES)
def test_same_values_and_gradients_as_conv2d(in_channels, kernel, stride, padding, bias):
    torch.manual_seed(1)
    reference = nn.Conv2d(in_channels, 8, kernel, stride, padding, bias=bias)
    fast = InputGradConv2d(in_channels, 8, kernel, stride, padding, bias=bias)
    fast.load_state_dict(reference.state_dict())
    assert list(fast.state_dict()) == list(reference.state_dict())
    x = torch.rand(5, in_channels, 30, 27)
    grads = []
    for module in (reference, fast):
        module.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), xi.grad, *(p.grad for p in module.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_the_fast_backward_is_used_only_where_it_applies(monkeypatch):
    calls = []
    original = conv_module._InputGradConv2dFunction.apply
    monkeypatch.setattr(conv_module._InputGradConv2dFunction, "apply", lambda *a: calls.append(1) or original(*a))
    conv = InputGradConv2d(1, 4, 3)
    conv(torch.rand(2, 1, 8, 8, requires_grad=True))
    assert calls == [1]
    conv(torch.rand(2, 1, 8, 8))  # one channel: the weight gradient alone is worth it (a plain CNN)
    assert calls == [1, 1]
    InputGradConv2d(3, 4, 3)(torch.rand(2, 3, 8, 8))  # three channels, no input gradient: plain nn.Conv2d
    conv.requires_grad_(False)
    conv(torch.rand(2, 1, 8, 8))  # no gradient needed at all
    assert calls == [1, 1]
    conv.requires_grad_(True)
    with torch.no_grad():
        conv(torch.rand(2, 1, 8, 8, requires_grad=True))
    InputGradConv2d(8, 4, 3)(torch.rand(2, 8, 8, 8, requires_grad=True))  # many channels: oneDNN is faster
    InputGradConv2d(1, 4, 3, dilation=2)(torch.rand(2, 1, 9, 9, requires_grad=True))
    InputGradConv2d(1, 4, 3, padding="same")(torch.rand(2, 1, 9, 9, requires_grad=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(torch.rand(2, 1, 8, 8, requires_grad=True))
    assert calls == [1, 1]


def test_weight_gradient_without_an_input_gradient_matches_conv2d():
    # The plain CNN's first layer: the input needs no gradient, the weights do.
    torch.manual_seed(2)
    reference = nn.Conv2d(1, 6, 9)
    fast = InputGradConv2d(1, 6, 9)
    fast.load_state_dict(reference.state_dict())
    x = torch.rand(7, 1, 42, 42)
    for module in (reference, fast):
        out = module(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    torch.testing.assert_close(fast.weight.grad, reference.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.bias.grad, reference.bias.grad, atol=1e-4, rtol=1e-4)


def test_st_cnn_uses_it_behind_the_transformer_and_trains_the_localisation():
    torch.manual_seed(0)
    model = classifier("st-cnn", "affine", (42, 42))
    assert isinstance(model.classifier[0], InputGradConv2d)
    x = torch.rand(4, 1, 42, 42)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    head = model.transformer.localisation.head.linear
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_compiles_without_graph_breaks():
    conv = InputGradConv2d(1, 4, 3)
    compiled = torch.compile(conv, fullgraph=True, backend="eager")
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    torch.testing.assert_close(compiled(x), conv(x))
