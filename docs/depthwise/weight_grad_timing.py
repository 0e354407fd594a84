"""Times of a depthwise 5x5 conv's backward parts on one CPU thread (channels-last, batch 128, 32 channels
at 32x32: the gated shape's first stage): oneDNN's input gradient, weight gradient and both, in float32
and bf16, then bench's own fused weight gradient (``depthwise_weight_grad``) compiled, with its largest
difference from oneDNN's relative to oneDNN's largest value.

    python docs/depthwise/weight_grad_timing.py
"""

import time

import torch
import torch.nn.functional as F

from bench.models.depthwise import depthwise_weight_grad

torch.set_num_threads(1)
BATCH, CHANNELS, SIZE, KERNEL, PAD = 128, 32, 32, 5, 2


def ms(fn, repeats: int = 10) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def tensors(dtype: torch.dtype):
    x, grad = (torch.randn(BATCH, CHANNELS, SIZE, SIZE, dtype=dtype).contiguous(memory_format=torch.channels_last) for _ in range(2))
    return x, grad, torch.randn(CHANNELS, 1, KERNEL, KERNEL, dtype=dtype)


def onednn_backward(x, grad, weight, mask):
    return torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [PAD, PAD], [1, 1], False, [0, 0], CHANNELS, mask)


for dtype in (torch.float32, torch.bfloat16):
    x, grad, weight = tensors(dtype)
    for part, mask in (("input gradient", [True, False, False]), ("weight gradient", [False, True, False]), ("both", [True, True, False])):
        print(f"{dtype} oneDNN {part}: {ms(lambda: onednn_backward(x, grad, weight, mask)):.1f} ms")
    flipped = weight.flip(2, 3)
    print(f"{dtype} input gradient as a conv2d with the flipped kernel: {ms(lambda: F.conv2d(grad, flipped, padding=PAD, groups=CHANNELS)):.1f} ms")

x, grad, weight = tensors(torch.float32)
reference = onednn_backward(x, grad, weight, [False, True, False])[1]
fused = torch.compile(depthwise_weight_grad)
difference = (fused(x, grad, KERNEL, PAD) - reference).abs().max() / reference.abs().max()
print(f"torch.float32 fused weight gradient, compiled: {ms(lambda: fused(x, grad, KERNEL, PAD)):.1f} ms, relative difference {difference:.2e}")
