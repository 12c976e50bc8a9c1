"""Triton kernels that only tests launch (the Philox check against ``tl.randint4x``/``tl.randn4x``).

They live at module level, with ``aot_specs``, so that the ahead-of-time compile in CI
(``python -m fasthvae.ops.triton_aot --also tests.triton_kernels``) lowers them like the package's
kernels: the interpreter accepts Python that compiled Triton rejects.
"""

from collections.abc import Iterator

import triton
import triton.language as tl

from fasthvae.ops.triton_aot import Spec

DRAW_BLOCK = 512
DRAW_OPTIONS = {"num_warps": 4, "maxnreg": 64}  # no spills on sm_80 or sm_90 (the AOT report)


@triton.jit
def philox_draw_kernel(out_ptr, ints_ptr, offs_ptr, seed, n, BLOCK: tl.constexpr):
    """For each counter offset: the four uint32 of ``tl.randint4x(seed, offset)`` (as int64) and
    output ``offset % 4`` of ``tl.randn4x(seed, offset // 4)``."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    offs = tl.load(offs_ptr + idx, mask=mask)
    c0, c1, c2, c3 = tl.randint4x(seed, offs)
    tl.store(ints_ptr + 4 * idx, c0.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(ints_ptr + 4 * idx + 1, c1.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(ints_ptr + 4 * idx + 2, c2.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(ints_ptr + 4 * idx + 3, c3.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    n0, n1, n2, n3 = tl.randn4x(seed, offs // 4)
    lane = offs % 4
    noise = tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))
    tl.store(out_ptr + idx, noise, mask=mask)


def aot_specs(dtype: str) -> Iterator[Spec]:
    """The launches the tests make (float32 noise, int64 seed and offsets; one per run, any dtype)."""
    if dtype != "fp32":
        return
    signature = {"out_ptr": "*fp32", "ints_ptr": "*i64", "offs_ptr": "*i64", "seed": "i64", "n": "i32",
                 "BLOCK": "constexpr"}  # fmt: skip
    yield Spec(
        f"philox_draw[{DRAW_BLOCK}]", philox_draw_kernel, signature, {"BLOCK": DRAW_BLOCK}, DRAW_OPTIONS
    )
