"""A stride-1 convolution's weight and bias gradients in one pass over its pixels.

>>> from fasthvae.ops import conv1x1_weight_grad, conv2d_weight_grad
>>> grad_w, grad_b = conv1x1_weight_grad(grad_y, x)   # [O, C, 1, 1] and [O]
>>> grad_w, grad_b = conv2d_weight_grad(grad_y, x, kernel_size=3, padding=1)   # [O, C, 3, 3] and [O]

With each pixel a row, a 1x1 convolution's ``grad_w = grad_y^T x`` and ``grad_b = grad_y^T 1`` sum
over many pixels into a small matrix; a KxK kernel's is the same product for each tap, over the
pixels that the tap pairs (x shifted by the tap, the padding's zeros left out); a grouped
convolution's, each group's on its own channels.
``fasthvae::conv2d_weight_grad`` and ``fasthvae::conv1x1_weight_grad`` (``csrc/weight_grad_cpu.cpp``)
form them in one pass, FMA register tiles over the pixels in tasks of a fixed size added in task
order (the bits do not depend on the thread count), on AVX2 + FMA; on other CPUs, or where neither
of a group's channel counts is a multiple of 8, ATen's products. The oneDNN convolution runs them
for its weight gradients where oneDNN has AVX2 at most. Float32 CPU tensors; elsewhere, under the
``reference`` backend or without ``fasthvae._C``, the wrappers compute the same gradients in torch.
``conv1x1_weight_grad``'s op takes the pixel matrices (``[P, O]`` and ``[P, C]``, rows of unit
column stride read where they lie); ``conv2d_weight_grad``'s the batches in any layout (read
channels_last) and returns the weight's gradient in channels_last strides. Their fake kernels are
registered here for ``torch.compile``. No autograd.
"""

import torch
from torch import Tensor

from fasthvae.ops import backend


def _register() -> None:
    @torch.library.register_fake("fasthvae::conv1x1_weight_grad")
    def _(grad_y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return grad_y.new_empty(grad_y.shape[1], x.shape[1]), grad_y.new_empty(grad_y.shape[1])

    @torch.library.register_fake("fasthvae::conv2d_weight_grad")
    def _(
        grad_y: Tensor, x: Tensor, kernel_size: list[int], padding: list[int], groups: int = 1
    ) -> tuple[Tensor, Tensor]:
        o, c, (kh, kw) = grad_y.shape[1], x.shape[1] // groups, kernel_size
        grad_w = grad_y.new_empty_strided((o, c, kh, kw), (kh * kw * c, 1, kw * c, c))
        return grad_w, grad_y.new_empty(o)


if backend.extension() is not None:
    _register()


def pixel_rows(t: Tensor) -> Tensor:
    """[N, C, H, W] as [N*H*W, C]: a view where ``t`` is channels_last."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def conv1x1_weight_grad(grad_y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """The weight gradient ``[O, C, 1, 1]`` and bias gradient ``[O]`` of a stride-1, unpadded 1x1
    convolution of ``x`` ``[N, C, H, W]`` whose output's gradient is ``grad_y`` ``[N, O, H, W]``."""
    batch_and_side = [(t.shape[0], *t.shape[2:]) if t.dim() == 4 else None for t in (grad_y, x)]
    if None in batch_and_side or batch_and_side[0] != batch_and_side[1]:
        raise ValueError(
            f"conv1x1_weight_grad: grad_y [N, O, H, W] and x [N, C, H, W] must share N, H and W, "
            f"got {tuple(grad_y.shape)} and {tuple(x.shape)}"
        )
    g, rows = pixel_rows(grad_y), pixel_rows(x)
    if backend.cpu_kernels_run(x) and x.dtype == grad_y.dtype == torch.float32:
        grad_w, grad_b = torch.ops.fasthvae.conv1x1_weight_grad(g, rows)
    else:
        grad_w, grad_b = g.t() @ rows, g.sum(0)
    return grad_w.view(*grad_w.shape, 1, 1), grad_b


def _pair(value: int | tuple[int, int], name: str) -> list[int]:
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"conv2d_weight_grad: {name} must be an int or two ints, got {value!r}")
    return pair


def conv2d_weight_grad(
    grad_y: Tensor,
    x: Tensor,
    kernel_size: int | tuple[int, int],
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """The weight gradient ``[O, C / groups, KH, KW]`` and bias gradient ``[O]`` of a stride-1
    convolution of ``x`` ``[N, C, H, W]`` with that kernel, (zero) padding and groups, whose output's
    gradient is ``grad_y`` ``[N, O, Ho, Wo]``."""
    kernel, pad = _pair(kernel_size, "kernel_size"), _pair(padding, "padding")
    if kernel[0] < 1 or kernel[1] < 1 or pad[0] < 0 or pad[1] < 0:
        raise ValueError(
            f"conv2d_weight_grad: kernel_size {kernel} must be positive, padding {pad} non-negative"
        )
    if grad_y.dim() != 4 or x.dim() != 4:
        raise ValueError(
            f"conv2d_weight_grad: grad_y [N, O, Ho, Wo] and x [N, C, H, W] must be 4-D, "
            f"got {tuple(grad_y.shape)} and {tuple(x.shape)}"
        )
    if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups or grad_y.shape[1] % groups:
        raise ValueError(
            f"conv2d_weight_grad: groups must be a positive int dividing x's {x.shape[1]} channels and "
            f"grad_y's {grad_y.shape[1]}, got {groups!r}"
        )
    out = [x.shape[2 + d] + 2 * pad[d] - kernel[d] + 1 for d in (0, 1)]
    if grad_y.shape[0] != x.shape[0] or list(grad_y.shape[2:]) != out:
        raise ValueError(
            f"conv2d_weight_grad: a {kernel[0]}x{kernel[1]} kernel with padding {pad} maps x "
            f"{tuple(x.shape)} to [{x.shape[0]}, O, {out[0]}, {out[1]}], but grad_y is {tuple(grad_y.shape)}"
        )
    if backend.cpu_kernels_run(x) and x.dtype == grad_y.dtype == torch.float32:
        return torch.ops.fasthvae.conv2d_weight_grad(grad_y, x, kernel, pad, groups)
    weight = x.new_empty(grad_y.shape[1], x.shape[1] // groups, *kernel)
    _, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_y, x, weight, [grad_y.shape[1]], [1, 1], pad, [1, 1], False, [0, 0], groups, [False, True, True]
    )
    return grad_w, grad_b
