"""A convolution whose backward pass is cheap on the CPU: the first layer after a spatial transformer.

In an ST-CNN the classifier's first convolution reads the transformer's
output, so backpropagation needs the gradient with respect to that
convolution's *input* (it is how the loss reaches ``theta``); in a plain CNN
that gradient is never computed. On the CPU, PyTorch computes it with oneDNN,
which is very slow for few input channels: for a 9x9 convolution from 1 to 32
channels on a batch of 256 42x42 images it took 220 ms here, three times the
forward convolution, while the im2col path of
``aten::_slow_conv2d_backward`` gives the same result in 25 ms. That one
operator was most of what the transformer added to an ST-CNN training step.

oneDNN's *weight* gradient is slow for one input channel too (62 ms for the
same layer at batch 128). With one input channel it is a single convolution of
the images with the output gradients, the batch taking the place of the
channels, which oneDNN runs in 13 ms. Against ``nn.Conv2d``, the RTS ST-CNN's
training step is 1.48x faster on a 2-core CPU, and 1.81x with the allocator
setting of :func:`stnkit.training.tune_cpu_allocator` (``benchmarks/cpu_step.py``).

:class:`InputGradConv2d` is an :class:`torch.nn.Conv2d` (same parameters, same
state-dict keys, same forward) that takes the input gradient from the im2col
path, and for one input channel the weight gradient from that convolution:
CPU float32/float64 tensors, at most :data:`MAX_IN_CHANNELS` input channels,
``groups=1``, no dilation, zero padding, outside autocast. Anywhere else, and
whenever no gradient it speeds up is needed, it is exactly ``nn.Conv2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InputGradConv2d", "input_grad_conv2d", "MAX_IN_CHANNELS"]

#: Input channels up to which the im2col input gradient was measured faster than oneDNN's
#: (1 and 3 channels: 9x and 3x faster; 32 channels: 1.6x slower).
MAX_IN_CHANNELS = 4


class _InputGradConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int], padding: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        if need_input:
            kernel = (int(weight.shape[2]), int(weight.shape[3]))
            grad_input = torch.ops.aten._slow_conv2d_backward(
                grad_output, x, weight, kernel, ctx.stride, ctx.padding, (True, False, False)
            )[0]
        if need_weight and x.shape[1] == 1:
            grad_weight = _weight_grad_one_channel(grad_output, x, weight, ctx.stride, ctx.padding)
            if need_bias and ctx.has_bias:
                grad_bias = grad_output.sum((0, 2, 3))
        elif need_weight or (need_bias and ctx.has_bias):
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_output, x, weight, [weight.shape[0]] if ctx.has_bias else None, ctx.stride, ctx.padding,
                (1, 1), False, (0, 0), 1, (False, bool(need_weight), bool(need_bias and ctx.has_bias)),
            )  # fmt: skip
        return grad_input, grad_weight, grad_bias, None, None


def _weight_grad_one_channel(grad_output: Tensor, x: Tensor, weight: Tensor, stride, padding) -> Tensor:
    # dL/dW[o, 0, i, j] = sum over batch and positions of grad_output[b, o] * x[b, 0] shifted by (i, j):
    # a convolution of the images (batch as channels) with the output gradients (batch as
    # channels), one GEMM-shaped call that oneDNN runs several times faster than its own
    # weight-gradient kernel for one input channel. A stride becomes a dilation of this
    # convolution, and its output can overhang the kernel by up to stride - 1: cut it off.
    kernel_h, kernel_w = int(weight.shape[2]), int(weight.shape[3])
    grad = F.conv2d(x.transpose(0, 1), grad_output.transpose(0, 1), padding=padding, dilation=stride)
    return grad[:, :, :kernel_h, :kernel_w].transpose(0, 1).contiguous()


def _fast_path_applies(x: Tensor, weight: Tensor) -> bool:
    return (
        torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and weight.dtype == x.dtype
        and x.dim() == 4
        and x.shape[1] <= MAX_IN_CHANNELS
        # The input gradient is faster for up to MAX_IN_CHANNELS channels, the weight gradient for one.
        and (x.requires_grad or (weight.requires_grad and x.shape[1] == 1))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def input_grad_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0
) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` with the fast CPU input gradient (see the module docstring).

    Args:
        x: ``(N, C_in, H, W)``.
        weight: ``(C_out, C_in, kH, kW)``.
        bias: ``(C_out,)`` or None.
        stride, padding: as in :func:`torch.nn.functional.conv2d` (ints or pairs; no string padding).

    Examples
    --------
    >>> x = torch.rand(2, 1, 12, 12, requires_grad=True)
    >>> w = torch.rand(4, 1, 5, 5, requires_grad=True)
    >>> input_grad_conv2d(x, w).sum().backward()
    >>> torch.allclose(x.grad, torch.autograd.grad(torch.nn.functional.conv2d(x, w).sum(), x)[0])
    True
    """
    stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if not _fast_path_applies(x, weight):
        return F.conv2d(x, weight, bias, stride, padding)
    return _InputGradConv2dFunction.apply(x, weight, bias, stride, padding)


class InputGradConv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` with a fast CPU input gradient; use it for the layer after a transformer.

    Same constructor, parameters and state-dict keys as ``nn.Conv2d``; see the
    module docstring for when the faster backward is used.

    Examples
    --------
    >>> conv = InputGradConv2d(1, 8, 3)
    >>> conv(torch.rand(2, 1, 10, 10)).shape
    torch.Size([2, 8, 8, 8])
    """

    def forward(self, input: Tensor) -> Tensor:
        usable = (
            self.groups == 1
            and self.dilation == (1, 1)
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and _fast_path_applies(input, self.weight)
        )
        if not usable:
            return super().forward(input)
        return _InputGradConv2dFunction.apply(input, self.weight, self.bias, self.stride, self.padding)
