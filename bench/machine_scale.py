"""A training step on the machine's scale: the FLOPs of one step per image
(``torch.utils.flop_counter``: convolutions and matrix products, forward and backward), and the
peak the device reaches on the same kind of work, measured in the same process: an fp32 sgemm and
the model's commonest convolution (the conv shape that holds most of the step's FLOPs) at the
benchmark's batch size, forward and backward, in the faster of NCHW and channels_last.
"""

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of ``step`` (run eagerly, once)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


@dataclass(frozen=True)
class ConvShape:
    """A 2-D convolution without its batch size: channels, kernel, stride, padding, groups, input size."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    size: tuple[int, int]

    def __str__(self) -> str:
        k, (h, w) = "x".join(map(str, self.kernel)), self.size
        return f"conv {k} {self.in_channels}->{self.out_channels} at {h}x{w}"


def commonest_conv(model: nn.Module, forward: Callable[[], object]) -> ConvShape:
    """The conv shape that holds the most forward FLOPs in one call of ``forward`` (a forward of
    ``model``), found with hooks on its ``nn.Conv2d`` modules."""
    flops: dict[ConvShape, int] = {}

    def record(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        shape = ConvShape(
            module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(module.stride),
            tuple(module.padding), module.groups, tuple(inputs[0].shape[-2:]),
        )  # fmt: skip
        per_output = 2 * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        flops[shape] = flops.get(shape, 0) + per_output * output.numel()

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            forward()
    finally:
        for hook in hooks:
            hook.remove()
    if not flops:
        raise ValueError("the model ran no nn.Conv2d")
    return max(flops, key=flops.get)


def _median_seconds(run: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    run()  # warm-up: allocation, kernel selection
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_sync(device: torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work (nothing on CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def sgemm_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an fp32 n x n matrix product (2 n^3 FLOPs), median of ``repeats``."""
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    return 2 * n**3 / _median_seconds(lambda: a @ b, device_sync(device), repeats) / 1e9


LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def conv_gflops(shape: ConvShape, batch: int, device: torch.device, repeats: int = 5) -> tuple[float, str]:
    """GFLOP/s of ``shape`` at ``batch`` images in fp32, forward and backward (input and weight
    gradients) as FlopCounterMode counts them, median of ``repeats``, in the faster of the two memory
    layouts, and that layout's name: the best the device does on that conv, whichever layout a
    variant runs in (on a CPU a small-channel conv can run several times faster in channels_last)."""
    conv = nn.Conv2d(
        shape.in_channels, shape.out_channels, shape.kernel, shape.stride, shape.padding,
        groups=shape.groups, bias=False,
    ).to(device)  # fmt: skip
    measured = []
    for name, layout in LAYOUTS.items():
        conv = conv.to(memory_format=layout)
        x = torch.randn(batch, shape.in_channels, *shape.size, device=device)
        x = x.contiguous(memory_format=layout).requires_grad_()
        grad = torch.randn_like(conv(x))  # laid out as the conv's output
        step = functools.partial(_forward_backward, conv, x, grad)
        measured.append((_step_gflops(step, device, repeats), name))
    return max(measured)


def _forward_backward(conv: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    conv(x).backward(grad)


def _step_gflops(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    return count_flops(step) / _median_seconds(step, device_sync(device), repeats) / 1e9
