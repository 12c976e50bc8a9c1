"""2-D convolution on oneDNN's primitives called directly (``csrc/onednn_conv.cpp``), for the small
convolutions whose cost in ATen is mostly its call path (``bench/bench_onednn_calls.py``).

>>> from fasthvae.ops import onednn_conv
>>> y = onednn_conv.conv2d(x, weight, bias, padding=1, groups=1)   # as F.conv2d, stride 1

CPU only; float32 or bfloat16 activations (computed and returned channels_last where the input or
the weight lies so, or on a 1x1 image; NCHW otherwise), weights of any float dtype (a float32
weight with bfloat16 activations is cast inside, and its gradient comes back in float32), stride 1,
no dilation. Registered as ``fasthvae_onednn::conv2d`` with fake kernels and autograd, so
``torch.compile(fullgraph=True)`` traces it as one node forward and one backward (the input's
gradient where it is needed, the weight's and the bias's). Double backward is not supported.

It needs a standalone oneDNN, which torch does not expose (its own is linked in without its API):
``pip install onednn-cpu-gomp onednn-devel-cpu-gomp`` (GNU OpenMP, the runtime torch loads), or
``$FASTHVAE_ONEDNN`` naming an install prefix (``include/oneapi/dnnl``, ``lib/libdnnl.so``). The op
is compiled on first use and cached by ``torch.utils.cpp_extension``. It calls kernels of fasthvae's
own extension, ``fasthvae._C``: the GELU of :func:`gelu_conv2d` and, where oneDNN runs float32 with
AVX2 at most, a 1x1 convolution's weight and bias gradients (``fasthvae::conv1x1_weight_grad``).
"""

import hashlib
import os
import sys
from pathlib import Path

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from fasthvae.ops import backend

ONEDNN_ENV = "FASTHVAE_ONEDNN"
SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "onednn_conv.cpp"
SHARED_HEADER = SOURCE.with_name("onednn_conv_primitives.h")  # also included by bench/onednn_calls.cpp
DTYPES = (torch.float32, torch.bfloat16)


def onednn_prefix() -> Path:
    """Where the standalone oneDNN is looked for: ``$FASTHVAE_ONEDNN``, else this Python's prefix."""
    return Path(os.environ.get(ONEDNN_ENV) or sys.prefix)


def onednn_files(prefix: Path) -> tuple[Path, Path]:
    """oneDNN's header and library under an install prefix."""
    return prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp", prefix / "lib" / "libdnnl.so"


def missing() -> str | None:
    """Why the op cannot be built here (a sentence naming the fix), or None when it can."""
    if not SOURCE.exists():
        return f"its source {SOURCE} is missing (install fasthvae from a clone, `pip install -e .`)"
    if backend.extension() is None:
        return (
            "fasthvae's C++ extension (fasthvae._C), which holds the GELU and 1x1 weight-gradient kernels "
            "the op calls, is not built: pip install --no-build-isolation -e ."
        )
    for path in onednn_files(onednn_prefix()):
        if not path.exists():
            return (
                f"no standalone oneDNN ({path} is missing): pip install onednn-cpu-gomp "
                f"onednn-devel-cpu-gomp, or set {ONEDNN_ENV} to an install prefix"
            )
    return None


def available() -> bool:
    return missing() is None


def build_args(prefix: Path) -> dict:
    """``torch.utils.cpp_extension.load``'s arguments for an extension on oneDNN under ``prefix``
    that includes ``csrc/``'s shared header. The header's digest is a define, so that a changed header
    rebuilds the extension (``load`` keys its cache by the sources and these arguments)."""
    lib = onednn_files(prefix)[1].parent
    digest = hashlib.sha256(SHARED_HEADER.read_bytes()).hexdigest()[:16]
    return {
        "extra_include_paths": [str(prefix / "include"), str(SOURCE.parent)],
        "extra_ldflags": [f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}"],
        "extra_cflags": ["-O2", f"-DFASTHVAE_ONEDNN_HEADER={digest}"],
    }


def build_name(base: str) -> str:
    """``base`` and a digest of this checkout's path: ``torch.utils.cpp_extension.load`` keeps one
    build per name and rebuilds it when the sources' paths or the flags change, so two checkouts
    sharing a build directory (a clone beside the working tree) would otherwise rebuild it in turn."""
    return f"{base}_{hashlib.sha256(str(SOURCE.parent).encode()).hexdigest()[:10]}"


_loaded = False


def load() -> None:
    """Compile (once, cached on disk) and load the op, which registers ``fasthvae_onednn::*``. The
    first :func:`conv2d` call does it; a function that ``torch.compile`` traces before any eager call
    needs it first (compiling a C++ extension is not traceable)."""
    global _loaded
    if _loaded:
        return
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "fasthvae: call fasthvae.ops.onednn_conv.load() before torch.compile traces conv2d"
        )
    reason = missing()
    if reason is not None:
        raise RuntimeError(f"fasthvae: the oneDNN convolution cannot be built: {reason}")
    from torch.utils.cpp_extension import load

    name = build_name("fasthvae_onednn_conv")
    load(name, [str(SOURCE)], is_python_module=False, **build_args(onednn_prefix()))
    _register()
    _loaded = True


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def computes_channels_last(x: Tensor, weight: Tensor) -> bool:
    """Whether the op computes (and returns) channels_last: when ``x`` or ``weight`` lies so, as
    ATen's convolution decides, or when a 1x1 image makes both layouts the same memory (oneDNN's
    faster kernels take channels_last)."""
    cl = torch.channels_last
    return x.shape[2] * x.shape[3] == 1 or cl in (suggest_memory_format(x), suggest_memory_format(weight))


def _output_shape(x: Tensor, weight: Tensor, padding: list[int]) -> tuple[int, int, int, int]:
    """The shape of a stride-1 convolution's output."""
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    return n, o, h + 2 * padding[0] - kh + 1, w + 2 * padding[1] - kw + 1


def _register() -> None:
    """The ops' fake kernels, for torch.compile (their autograd is registered in C++)."""

    @torch.library.register_fake("fasthvae_onednn::conv2d")
    def _(
        x: Tensor, weight: Tensor, bias: Tensor | None, padding: list[int], groups: int, channels_last: bool
    ):
        shape = _output_shape(x, weight, padding)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_format(channels_last))

    @torch.library.register_fake("fasthvae_onednn::conv2d_backward")
    def _(
        grad_y: Tensor,
        x: Tensor,
        weight: Tensor,
        padding: list[int],
        groups: int,
        channels_last: bool,
        input_grad: bool,
    ):
        shape = x.shape if input_grad else (0,)
        fmt = _format(channels_last) if input_grad else torch.contiguous_format
        return (
            torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt),
            torch.empty_strided(weight.shape, weight.stride(), dtype=weight.dtype, device=weight.device),
            weight.new_empty(weight.shape[0], dtype=torch.float32),
        )

    @torch.library.register_fake("fasthvae_onednn::gelu_conv2d")
    def _(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        padding: list[int],
        groups: int,
        channels_last: bool,
        bfloat16: bool,
        derivative: bool,
    ):
        fmt = _format(channels_last)
        dtype = torch.bfloat16 if bfloat16 else x.dtype
        y = torch.empty(_output_shape(x, weight, padding), dtype=dtype, device=x.device, memory_format=fmt)
        activation = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)
        d = torch.empty_like(activation, dtype=x.dtype) if derivative else x.new_empty(0)
        return y, activation, d


def _dense(t: Tensor) -> Tensor:
    return t if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) else t.contiguous()


def _autocast_dtype() -> torch.dtype | None:
    """The CPU autocast dtype where autocast is on and it is one the op computes in, else None."""
    dtype = torch.get_autocast_dtype("cpu")
    return dtype if torch.is_autocast_enabled("cpu") and dtype in DTYPES else None


def _op_arguments(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: int | tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor | None, list[int], bool]:
    """(x in the layout the op computes in, the weight dense, the bias in float32, the padding as two
    ints, whether that layout is channels_last)."""
    pad = [padding, padding] if isinstance(padding, int) else list(padding)
    bias = None if bias is None else bias.float()
    weight = _dense(weight)
    channels_last = computes_channels_last(x, weight)
    return x.contiguous(memory_format=_format(channels_last)), weight, bias, pad, channels_last


def conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, padding: int | tuple[int, int] = 0, groups: int = 1
) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding, groups=groups)`` (stride 1) on oneDNN. Under CPU
    autocast to bfloat16, ``x`` is cast and ``weight`` and ``bias`` stay as they are (the op casts
    the weight into its packed layout; the bias is added in float32)."""
    if not _loaded:
        load()
    if (autocast := _autocast_dtype()) is not None:
        x = x.to(autocast)
    if x.dtype not in DTYPES:
        raise TypeError(f"fasthvae_onednn.conv2d: x must be float32 or bfloat16, not {x.dtype}")
    x, weight, bias, pad, channels_last = _op_arguments(x, weight, bias, padding)
    return torch.ops.fasthvae_onednn.conv2d(x, weight, bias, pad, groups, channels_last)


def gelu_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, padding: int | tuple[int, int] = 0, groups: int = 1
) -> Tensor:
    """``conv2d(F.gelu(x), weight, bias, padding, groups)`` in one op: the GELU of
    :func:`fasthvae.ops.gelu` (its derivative kept for the backward, where ``x`` needs a gradient),
    written in the convolution's dtype (bfloat16 under CPU autocast, also from a float32 ``x``; else
    ``x``'s). Needs fasthvae's C++ extension (``fasthvae._C``), which holds the GELU's kernels."""
    if not _loaded:
        load()
    if x.dtype not in DTYPES:
        raise TypeError(f"fasthvae_onednn.gelu_conv2d: x must be float32 or bfloat16, not {x.dtype}")
    to_bfloat16 = _autocast_dtype() == torch.bfloat16 and x.dtype != torch.bfloat16
    x, weight, bias, pad, channels_last = _op_arguments(x, weight, bias, padding)
    derivative = torch.is_grad_enabled() and x.requires_grad
    y, _, _ = torch.ops.fasthvae_onednn.gelu_conv2d(
        x, weight, bias, pad, groups, channels_last, to_bfloat16, derivative
    )
    return y
