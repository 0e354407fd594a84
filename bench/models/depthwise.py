"""The ConvNeXt family's depthwise conv, and the two CPU paths that make it fast.

On the CPUs here oneDNN trains a depthwise 5x5 or 7x7 conv slowly in two places (docs/speed.md):
its bf16 kernels run 3-4x slower than its float32 ones, and in float32 the weight gradient costs six
times the forward pass (a 5x5 over 32 channels at 32x32, batch 128: forward 4 ms, input gradient 5 ms,
weight gradient 32 ms). So on the CPU the conv runs in float32 under bf16 autocast, and inside a
``torch.compile``d step its weight gradient is written as k^2 shifted products summed over the batch,
which inductor fuses into one pass over the activations (15 ms there) when the gradient reaching the
conv is channels-last; the family turns this off where the norm after the conv is a GroupNorm.
That sum wins only where inductor writes it with AVX-512 vectors: on an AVX2-only CPU it takes 61 ms
against oneDNN's 35, and the whole compiled gated_bn step runs 0.84-0.89x with it, so there the
compiled step keeps oneDNN's kernel too.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


# Read when a step is compiled: on Zen 4 (AVX-512) 1.42x the gated_bn step; on Zen 3 (AVX2) 0.84-0.89x.
FUSED_WEIGHT_GRAD_WINS = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise conv with the CPU paths above, the fused one only where ``plain_depthwise``, the CPU
    has AVX-512 and it is not turned off with ``fused_weight_grad=False``. Same parameters and names as
    nn.Conv2d, so logged models load into either."""

    fused_weight_grad = True  # a class default too: models pickled before this field existed lack the attribute

    def __init__(self, *args, fused_weight_grad: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_weight_grad = fused_weight_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            x = x.float()
            if FUSED_WEIGHT_GRAD_WINS and self.fused_weight_grad and torch.compiler.is_compiling() and self.plain_depthwise():
                return DepthwiseConvFunction.apply(x, self.weight, self.padding[0])
            return super().forward(x)

    def plain_depthwise(self) -> bool:
        """What DepthwiseConvFunction computes: one filter a channel, stride 1, same-size padding, no bias."""
        return (self.groups == self.in_channels == self.out_channels and self.bias is None
                and self.stride == (1, 1) and self.dilation == (1, 1) and self.padding_mode == "zeros"
                and self.padding == (self.kernel_size[0] // 2,) * 2 and self.kernel_size[0] == self.kernel_size[1])


def depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel: int, pad: int) -> torch.Tensor:
    """d loss / d weight of a stride-1 depthwise conv: for each kernel offset, the input shifted by it
    times the output gradient, summed over batch and positions. Shape (channels, 1, kernel, kernel)."""
    padded = F.pad(x, (pad, pad, pad, pad))
    height, width = x.shape[-2:]
    sums = [(padded[:, :, i:i + height, j:j + width] * grad).sum((0, 2, 3))
            for i in range(kernel) for j in range(kernel)]
    return torch.stack(sums, 1).view(x.shape[1], 1, kernel, kernel)


class DepthwiseConvFunction(torch.autograd.Function):
    """F.conv2d of a depthwise conv whose backward inductor can fuse: the input gradient from aten's
    own kernel (fast already), the weight gradient from ``depthwise_weight_grad``."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, pad: int) -> torch.Tensor:
        return F.conv2d(x, weight, padding=pad, groups=weight.shape[0])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, pad = inputs
        ctx.save_for_backward(x, weight)
        ctx.pad = pad

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        channels, pad = weight.shape[0], ctx.pad
        grad_x = torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], channels, [True, False, False])[0]
        return grad_x, depthwise_weight_grad(x, grad, weight.shape[-1], pad), None
