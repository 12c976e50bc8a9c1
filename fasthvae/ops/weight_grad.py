"""A 1x1 convolution's weight and bias gradients in one pass over its pixels.

>>> from fasthvae.ops import conv1x1_weight_grad
>>> grad_w, grad_b = conv1x1_weight_grad(grad_y, x)   # [O, C, 1, 1] and [O]

With each pixel a row, ``grad_w = grad_y^T x`` and ``grad_b = grad_y^T 1`` sum over many pixels
into a small matrix. ``fasthvae::conv1x1_weight_grad`` (``csrc/weight_grad_cpu.cpp``) forms both in
one pass, FMA register tiles over the pixels in tasks of a fixed size added in task order (the bits
do not depend on the thread count), on AVX2 + FMA; on other CPUs, or where neither channel count is
a multiple of 8, the ATen products. The oneDNN convolution runs it for its 1x1 weight gradients
where oneDNN has AVX2 at most. Float32 CPU tensors; elsewhere, under the ``reference`` backend or
without ``fasthvae._C``, :func:`conv1x1_weight_grad` computes the same products in torch. The op
takes the pixel matrices (``[P, O]`` and ``[P, C]``, rows of unit column stride read where they
lie); its fake kernel is registered here for ``torch.compile``. No autograd.
"""

import torch
from torch import Tensor

from fasthvae.ops import backend


def _register() -> None:
    @torch.library.register_fake("fasthvae::conv1x1_weight_grad")
    def _(grad_y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return grad_y.new_empty(grad_y.shape[1], x.shape[1]), grad_y.new_empty(grad_y.shape[1])


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
