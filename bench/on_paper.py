"""The fused ops on a GPU, on paper: bytes each kernel moves, the time that takes at full memory
bandwidth, the programs a Triton launch spreads over the SMs, and the Triton kernels' registers,
spills and occupancy from the ahead-of-time compile.

The Gaussian kernels are memory-bound (a few dozen flops per element against 8-36 bytes), so the
bytes they must move over the bandwidth is the time they cannot beat. The mixture likelihood's
compute some 35-40 transcendental functions per component and pixel against 420 bytes per pixel
forward (float32, 10 components): they may be bound by compute instead, so their bytes are a
floor, and the GPU bench shows where they land. Bytes counted: every tensor
the kernel reads or writes once (its inputs, outputs and gradients) plus the float32 row sums.

Launch shape: one program per TILE (1,024) elements, whole rows up to TILE wide. A latent with
fewer than TILE x SMs elements leaves SMs idle (a [256, 128] latent: 32 programs on an H200's 132
SMs), but such a latent moves under 1 MB, 0.2 µs at 4.3 TB/s, less than a kernel launch's own
latency of a few µs: more programs are not expected to shorten it (bench_ops on the GPU measures
it). The sampling kernels on rows a multiple of 4 draw one Philox call per four elements and put
its outputs back in element order with ``tl.interleave``, which costs 4 KB of shared memory per
program (the AOT report's shared bytes): no limit at 8 programs per SM against 228 KB. Other rows
draw one call per element, four times the Philox work.
"""

import math
from dataclasses import dataclass

# Bytes/s: H200, the device-to-device copy reported for the GPU machine the self-check meets (not
# yet measured by this project); H100 and A100, HBM bandwidth from the data sheets.
BANDWIDTH = {"H200": 4.3e12, "H100 SXM": 3.35e12, "A100 80GB": 2.0e12}
SMS = {"H200": 132}
ARCHS = (80, 90)


@dataclass(frozen=True)
class Traffic:
    """Per pass: full-size tensors read and written, and float32 row vectors moved."""

    forward_tensors: int
    forward_rows: int
    backward_tensors: int
    backward_rows: int
    sample: bool
    kl: bool
    prior: bool


# kl: read mu, logvar (and the prior's two) / write the row sums; backward: read those and the
# rows' gradient, write a gradient per input. reparameterize: read mu, logvar / write z; backward:
# read logvar and dz, write dmu, dlogvar (the noise is regenerated, never stored).
TRAFFIC = {
    "kl-std": Traffic(2, 1, 2 + 2, 1, sample=False, kl=True, prior=False),
    "kl-prior": Traffic(4, 1, 4 + 4, 1, sample=False, kl=True, prior=True),
    "reparameterize": Traffic(2 + 1, 0, 2 + 2, 0, sample=True, kl=False, prior=False),
    "sample_and_kl-prior": Traffic(4 + 1, 1, 5 + 4, 1, sample=True, kl=True, prior=True),
}
AOT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def bytes_moved(op: str, shape: tuple[int, ...], dtype: str) -> tuple[int, int]:
    """(forward, backward) bytes of the fused kernels for ``op`` on a ``shape`` input."""
    traffic = TRAFFIC[op]
    tensor = math.prod(shape) * ELEMENT_BYTES[dtype]
    rows = shape[0] * 4
    return (
        traffic.forward_tensors * tensor + traffic.forward_rows * rows,
        traffic.backward_tensors * tensor + traffic.backward_rows * rows,
    )


def kernel_flags(op: str, shape: tuple[int, ...]) -> tuple[dict, dict]:
    """The constants the Triton forward and backward kernels are launched with for ``op``."""
    from fasthvae.ops import triton_kernels as tk
    from fasthvae.ops.reference import KL_NONE, KL_ROWS

    traffic = TRAFFIC[op]
    tile = tk.launch_tile(math.prod(shape[1:]), traffic.sample)
    kl_mode = KL_ROWS if traffic.kl else KL_NONE
    forward = {"SAMPLE": traffic.sample, "KL_MODE": kl_mode, "PRIOR": traffic.prior}
    backward = {"SAMPLE": traffic.sample, "KL": traffic.kl, "PRIOR": traffic.prior, "GRAD_ROWS": traffic.kl}
    return {**forward, **tile}, {**backward, **tile}


def programs(op: str, shape: tuple[int, ...]) -> int:
    """Programs of the Triton forward launch for ``op`` on a ``shape`` input."""
    from fasthvae.ops import triton_kernels as tk

    block_r, block_c = tk.tile_shape(math.prod(shape[1:]))
    return math.ceil(shape[0] / block_r) * math.ceil(math.prod(shape[1:]) / block_c)


def _resources(kernels: list[tuple[str, str, dict]], dtype: str) -> str:
    """Registers and occupancy per arch (and spills, if any) of ``kernels`` ((label, AOT kind, the
    selection kernel_resources takes)), or why they could not be compiled."""
    try:
        from fasthvae.ops.triton_aot import kernel_resources

        parts, spilled = [], 0
        for arch in ARCHS:
            described = []
            for label, kind, selection in kernels:
                usage = kernel_resources(kind, AOT_DTYPES[dtype], arch, **selection)
                spilled += usage.spill_stores + usage.spill_loads
                described.append(f"{label} {usage.registers} regs {usage.occupancy:.0%}")
            parts.append(f"sm_{arch}: {', '.join(described)}")
        return "; ".join(parts) + (f"; {spilled} B spilled" if spilled else "; no spills")
    except (ImportError, RuntimeError) as error:  # no Triton, or its interpreter is on
        return f"not compiled ({str(error).splitlines()[0]})"


def registers(op: str, shape: tuple[int, ...], dtype: str) -> str:
    """The forward and backward kernels ``op`` launches at ``shape``: :func:`_resources`."""
    forward, backward = kernel_flags(op, shape)
    return _resources([("forward", "forward", forward), ("backward", "backward", backward)], dtype)


def _row(op: str, shape_name: str, dtype: str, moved: tuple[int, int], programs: int, triton: str) -> dict:
    """A table row: (forward, backward) bytes, ideal microseconds per GPU and pass, the launch."""
    fwd, bwd = moved
    row: dict = {"op": op, "shape": shape_name, "dtype": dtype, "forward_MB": round(fwd / 1e6, 3),
                 "backward_MB": round(bwd / 1e6, 3)}  # fmt: skip
    for gpu, bandwidth in BANDWIDTH.items():
        row[f"{gpu} forward_us"] = round(fwd / bandwidth * 1e6, 2)
        row[f"{gpu} backward_us"] = round(bwd / bandwidth * 1e6, 2)
    return {**row, "programs": programs, "triton": triton}


MIXTURE_COMPONENTS = 10


def mixture_bytes(pixels: int, dtype: str) -> tuple[int, int]:
    """(forward, backward) bytes of the mixture kernels on ``pixels`` pixels: per pixel the forward
    reads x (3 float32) and 10 K parameters and writes -log p and the logsumexp of the logits
    (float32 each); the backward reads all of those and the upstream gradient (float32) and writes
    the parameters' gradient."""
    params = 10 * MIXTURE_COMPONENTS * ELEMENT_BYTES[dtype]
    forward = 3 * 4 + params + 2 * 4
    return pixels * forward, pixels * (forward + 4 + params)


def mixture_rows(images: dict[str, tuple[int, int, int]], dtype: str) -> list[dict]:
    """The mixture likelihood's rows: images [B, H, W] of a decoder with 10 components."""
    from fasthvae.ops.triton_likelihoods import BLOCK_PIXELS

    kernels = [(kind, "likelihoods", {"name": f"mixture_{kind}"}) for kind in ("forward", "backward")]
    triton = _resources(kernels, dtype)
    return [
        _row("mixture-nll", name, dtype, mixture_bytes(math.prod(shape), dtype),
             math.ceil(math.prod(shape) / BLOCK_PIXELS), triton)
        for name, shape in images.items()
    ]  # fmt: skip


def rows(ops: list[str], shapes: dict[str, tuple[int, ...]], dtype: str) -> list[dict]:
    """One row per op and shape: bytes, ideal microseconds per GPU and pass, Triton resources."""
    return [
        _row(op, name, dtype, bytes_moved(op, shape, dtype), programs(op, shape), registers(op, shape, dtype))
        for op in ops
        for name, shape in shapes.items()
    ]


TITLE = "The fused ops on a GPU, on paper"
INTRO = (
    "Bytes: what the fused kernels read and write once (MB = 10^6 B); ideal time: bytes over HBM "
    f"bandwidth ({', '.join(f'{g} {b / 1e12:.2f} TB/s' for g, b in BANDWIDTH.items())}). Triton: "
    "registers and occupancy of the forward and backward kernels each op launches at that shape, and "
    "spilled bytes, from "
    "`ptxas -v` on the ahead-of-time compile (`python -m fasthvae.ops.triton_aot --report`)."
)
HEADER = ["op", "shape", "dtype", "fwd MB", "bwd MB", *(f"{g} fwd / bwd µs" for g in BANDWIDTH)]
HEADER += ["programs", "Triton kernels (AOT)"]


def cells(r: dict) -> list[str]:
    times = [f"{r[f'{g} forward_us']} / {r[f'{g} backward_us']}" for g in BANDWIDTH]
    sizes = [r["op"], r["shape"], r["dtype"], str(r["forward_MB"]), str(r["backward_MB"])]
    return [*sizes, *times, str(r["programs"]), r["triton"]]
