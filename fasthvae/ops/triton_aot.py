"""Compile every Triton kernel specialization ahead of time for real GPUs, with no GPU present.

``python -m fasthvae.ops.triton_aot --arch 80 90`` lowers each kernel (forward and backward, every
flag combination, float32/float16/bfloat16) to PTX and a cubin, catching what the interpreter
forgives (types, layouts, unsupported ops). Must run without ``TRITON_INTERPRET``.

``--also MODULE`` compiles the kernels of another module too (the tests' own kernels): a module
with ``@triton.jit`` kernels gives ``aot_specs(dtype)``, an iterator of :class:`Spec`.

``--report DIR`` also writes ``triton_resources.md`` and ``.csv``: each kernel's registers, stack
and spills (``ptxas -v`` with Triton's own flags on Triton's PTX), shared memory and the occupancy
they allow, flagging a kernel that spills or stays below 50% occupancy.
"""

import argparse
import csv
import importlib
import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fasthvae.ops.reference import KL_ELEMENTWISE, KL_NONE, KL_ROWS

DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
# Tile shapes compiled: a row of TILE columns (wide latents) and TILE // 128 rows of 128 (a 128-wide
# latent); every other width compiles the same code with other constants.
ROW_WIDTHS = (None, 128)


@dataclass(frozen=True)
class Spec:
    """One kernel specialization to compile: the ``@triton.jit`` function, its signature (argument
    name to Triton type, ``constexpr`` for compile-time ones), the constexpr values and the launch
    options (``num_warps``, ``maxnreg``)."""

    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    options: dict[str, int] = field(default_factory=lambda: {"num_warps": 4})


def _package_options() -> dict[str, int]:
    from fasthvae.ops import triton_kernels as tk

    return {"num_warps": tk.NUM_WARPS, "maxnreg": tk.MAX_REGISTERS}


def _tiles() -> Iterator[tuple[int, int]]:
    from fasthvae.ops import triton_kernels as tk

    for width in ROW_WIDTHS:
        yield tk.tile_shape(width or tk.TILE)


def _forward_specs(dtype: str) -> Iterator[Spec]:
    from fasthvae.ops import triton_kernels as tk

    for (block_r, block_c), sample, kl_mode, prior, aligned in itertools.product(
        _tiles(), (False, True), (KL_NONE, KL_ELEMENTWISE, KL_ROWS), (False, True), (False, True)
    ):
        no_kl = kl_mode == KL_NONE
        if (not sample and no_kl) or (prior and no_kl) or (aligned and not sample):
            continue
        ptr = f"*{dtype}"
        sig = {
            "mu_ptr": ptr, "lv_ptr": ptr,
            "mup_ptr": ptr if prior else "constexpr", "lvp_ptr": ptr if prior else "constexpr",
            "z_ptr": ptr if sample else "constexpr",
            "kl_ptr": {KL_NONE: "constexpr", KL_ELEMENTWISE: ptr, KL_ROWS: "*fp32"}[kl_mode],
            "seed_ptr": "*i64" if sample else "constexpr", "rows": "i32", "inner": "i32", "col_blocks": "i32",
            "SAMPLE": "constexpr", "KL_MODE": "constexpr", "PRIOR": "constexpr", "ALIGNED": "constexpr",
            "BLOCK_R": "constexpr", "BLOCK_C": "constexpr",
        }  # fmt: skip
        flags = {"SAMPLE": sample, "KL_MODE": kl_mode, "PRIOR": prior, "ALIGNED": aligned}
        consts = {**flags, "BLOCK_R": block_r, "BLOCK_C": block_c}
        consts.update({k: None for k, v in sig.items() if v == "constexpr" and k.endswith("_ptr")})
        name = f"forward[{block_r}x{block_c},sample={sample},kl={kl_mode},prior={prior},aligned={aligned}]"
        yield Spec(name, tk.gaussian_forward_kernel, sig, consts, _package_options())


def _backward_specs(dtype: str) -> Iterator[Spec]:
    from fasthvae.ops import triton_kernels as tk

    for (block_r, block_c), (sample, kl, prior, rows, aligned) in itertools.product(
        _tiles(), itertools.product((False, True), repeat=5)
    ):
        if not (sample or kl) or ((prior or rows) and not kl) or (aligned and not sample):
            continue
        ptr = f"*{dtype}"
        sig = {
            "mu_ptr": ptr if kl else "constexpr", "lv_ptr": ptr,
            "mup_ptr": ptr if prior else "constexpr", "lvp_ptr": ptr if prior else "constexpr",
            "gz_ptr": ptr if sample else "constexpr",
            "gk_ptr": ("*fp32" if rows else ptr) if kl else "constexpr",
            "dmu_ptr": ptr, "dlv_ptr": ptr,
            "dmup_ptr": ptr if prior else "constexpr", "dlvp_ptr": ptr if prior else "constexpr",
            "seed_ptr": "*i64" if sample else "constexpr", "rows": "i32", "inner": "i32", "col_blocks": "i32",
            "SAMPLE": "constexpr", "KL": "constexpr", "PRIOR": "constexpr", "GRAD_ROWS": "constexpr",
            "ALIGNED": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr",
        }  # fmt: skip
        flags = {"SAMPLE": sample, "KL": kl, "PRIOR": prior, "GRAD_ROWS": rows, "ALIGNED": aligned}
        consts = {**flags, "BLOCK_R": block_r, "BLOCK_C": block_c}
        consts.update({k: None for k, v in sig.items() if v == "constexpr" and k.endswith("_ptr")})
        tile = f"{block_r}x{block_c}"
        name = f"backward[{tile},sample={sample},kl={kl},prior={prior},rows={rows},aligned={aligned}]"
        yield Spec(name, tk.gaussian_backward_kernel, sig, consts, _package_options())


def _likelihood_specs(dtype: str) -> Iterator[Spec]:
    from fasthvae.ops import triton_likelihoods as tl_

    options = {"num_warps": tl_.NUM_WARPS}
    ptr, ints = f"*{dtype}", lambda *names: dict.fromkeys(names, "i32")
    strides = [f"{t}s{d}" for t in "xpd" for d in "bchw"]
    mixture = {"x_ptr": "*fp32", "p_ptr": ptr, "nll_ptr": "*fp32", "lse_ptr": "*fp32"}
    sig = {**mixture, **ints("pixels", "hw", "width", "K", *strides[:8]), "BLOCK": "constexpr"}
    yield Spec("mixture_forward", tl_.mixture_forward_kernel, sig, {"BLOCK": tl_.BLOCK_PIXELS}, options)
    sig = {**mixture, "g_ptr": "*fp32", "d_ptr": ptr, **ints("pixels", "hw", "width", "K", *strides)}
    sig["BLOCK"] = "constexpr"
    yield Spec("mixture_backward", tl_.mixture_backward_kernel, sig, {"BLOCK": tl_.BLOCK_PIXELS}, options)
    sig = {"x_ptr": "*fp32", "mean_ptr": ptr, "ls_ptr": ptr, "nll_ptr": ptr, "n": "i32", "BLOCK": "constexpr"}
    yield Spec("logistic_forward", tl_.logistic_forward_kernel, sig, {"BLOCK": tl_.BLOCK_ELEMENTS}, options)
    sig = {"x_ptr": "*fp32", "mean_ptr": ptr, "ls_ptr": ptr, "g_ptr": ptr, "dm_ptr": ptr, "dl_ptr": ptr}
    sig.update({"n": "i32", "BLOCK": "constexpr"})
    yield Spec("logistic_backward", tl_.logistic_backward_kernel, sig, {"BLOCK": tl_.BLOCK_ELEMENTS}, options)


# Per-SM limits of sm_80 (A100) and sm_90 (H100), from NVIDIA's CUDA occupancy calculator.
SM_REGISTERS = 65536
SM_MAX_WARPS = 64
SM_MAX_BLOCKS = 32
REGISTER_GRANULE = 256  # registers are allocated per warp in units of this many
SM_SHARED = {80: 164 * 1024, 90: 228 * 1024}
BLOCK_RESERVED_SHARED = 1024  # shared memory the system keeps per block


def occupancy(registers: int, num_warps: int, shared: int, arch: int) -> float:
    """Resident warps per SM over the most an SM holds, as registers, shared memory and block
    limits allow (the CUDA occupancy calculator's model)."""
    per_warp = math.ceil(registers * 32 / REGISTER_GRANULE) * REGISTER_GRANULE
    blocks = min(
        SM_MAX_BLOCKS,
        SM_MAX_WARPS // num_warps,
        (SM_REGISTERS // per_warp) // num_warps,
        SM_SHARED.get(arch, SM_SHARED[80]) // (shared + BLOCK_RESERVED_SHARED),
    )
    return blocks * num_warps / SM_MAX_WARPS


@dataclass
class Resources:
    """What one compiled kernel needs per thread and per block, and the occupancy that allows."""

    arch: int
    dtype: str
    kernel: str
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    num_warps: int
    occupancy: float

    @property
    def flagged(self) -> bool:
        """Spills, or fewer than half the warps an SM holds: to be fixed or justified."""
        return self.spill_stores > 0 or self.spill_loads > 0 or self.occupancy < 0.5


def ptxas_resources(ptx: str, arch: int) -> dict[str, int]:
    """Registers, stack and spills of ``ptx``, from ``ptxas -v`` run as Triton runs it."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        gpu = f"--gpu-name={sm_arch_from_capability(arch)}"
        flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", gpu]
        cmd = [get_ptxas(arch).path, *flags, str(src), "-o", f"{src}.o"]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    found = {
        "registers": re.search(r"Used (\d+) registers", log),
        "stack_bytes": re.search(r"(\d+) bytes stack frame", log),
        "spill_stores": re.search(r"(\d+) bytes spill stores", log),
        "spill_loads": re.search(r"(\d+) bytes spill loads", log),
    }
    missing = [k for k, m in found.items() if m is None]
    if missing:
        raise RuntimeError(f"ptxas -v printed no {', '.join(missing)}:\n{log}")
    return {k: int(m.group(1)) for k, m in found.items()}


def _compile(spec: Spec, arch: int):
    """One kernel specialization compiled for compute capability ``arch``."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton.compile(
        ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs),
        target=GPUTarget("cuda", arch, 32),
        options=spec.options,
    )


def _resources(compiled, arch: int, dtype: str, spec: Spec) -> Resources:
    usage = ptxas_resources(compiled.asm["ptx"], arch)
    shared = compiled.metadata.shared
    warps = spec.options.get("num_warps", 4)
    share = occupancy(usage["registers"], warps, shared, arch)
    return Resources(arch, dtype, spec.name, **usage, shared_bytes=shared, num_warps=warps, occupancy=share)


SPECS = {"forward": _forward_specs, "backward": _backward_specs, "likelihoods": _likelihood_specs}


def specs(dtype: str, also: tuple[str, ...] = ()) -> Iterator[Spec]:
    """Every specialization of the package's kernels in ``dtype``, then those of each module in
    ``also`` (its ``aot_specs(dtype)``)."""
    for kind_specs in SPECS.values():
        yield from kind_specs(dtype)
    for module in also:
        yield from importlib.import_module(module).aot_specs(dtype)


def kernel_resources(
    kind: str, dtype: str, arch: int, name: str | None = None, **consts: object
) -> Resources:
    """Resources of the ``kind`` kernel ("forward", "backward" or "likelihoods", then ``name``:
    "mixture_forward", ...) specialized with ``consts`` (every flag and both tile sizes, e.g. as
    :mod:`fasthvae.ops.triton_kernels` launches it)."""
    matches = [
        s
        for s in SPECS[kind](dtype)
        if (name is None or s.name == name) and all(s.constexprs.get(k) == v for k, v in consts.items())
    ]
    if len(matches) != 1:
        raise ValueError(f"{len(matches)} {kind} kernels match {consts} (give every flag and the tile)")
    return _resources(_compile(matches[0], arch), arch, dtype, matches[0])


def compile_all(
    archs: list[int],
    dtypes: list[str],
    out_dir: Path | None = None,
    resources: bool = False,
    also: tuple[str, ...] = (),
) -> list[Resources | None]:
    """Compile every specialization (the package's, then those of the modules in ``also``) for
    each arch and dtype; one entry per kernel compiled, its :class:`Resources` when ``resources``
    is asked for."""
    compiled_kernels: list[Resources | None] = []
    for arch, dtype in itertools.product(archs, dtypes):
        for spec in specs(dtype, also):
            start = time.perf_counter()
            compiled = _compile(spec, arch)
            assert compiled.asm["cubin"], f"no cubin for {spec.name}"
            if out_dir is not None:
                stem = f"sm{arch}_{dtype}_{spec.name}".replace("[", "_").replace("]", "").replace(",", "_")
                (out_dir / f"{stem}.ptx").write_text(compiled.asm["ptx"])
            compiled_kernels.append(_resources(compiled, arch, dtype, spec) if resources else None)
            print(f"sm_{arch} {dtype:5s} {spec.name}: ok ({time.perf_counter() - start:.1f}s)", flush=True)
    return compiled_kernels


def write_report(usages: list[Resources], out_dir: Path, command: str) -> None:
    """``triton_resources.csv`` and ``.md`` in ``out_dir``: one row per compiled kernel."""
    fields = [*asdict(usages[0]), "flagged"]
    with open(out_dir / "triton_resources.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({**asdict(u), "flagged": u.flagged} for u in usages)
    lines = [
        "# Triton kernels: registers, spills and occupancy from the ahead-of-time compile",
        "",
        f"Command: `{command}`  ",
        "Registers, stack and spills: `ptxas -v` with Triton's flags on Triton's PTX; occupancy: resident "
        "warps per SM over 64, as registers, shared memory and the 32-block limit allow. "
        "Flagged: spills, or occupancy below 50%.",
        "",
        "| arch | dtype | kernel | registers | stack (B) | spill st/ld (B) | shared (B) | warps | occupancy "
        "| flagged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| sm_{u.arch} | {u.dtype} | `{u.kernel}` | {u.registers} | {u.stack_bytes} | {u.spill_stores}/"
        f"{u.spill_loads} | {u.shared_bytes} | {u.num_warps} | {u.occupancy:.0%} "
        f"| {('no', 'yes')[u.flagged]} |"
        for u in usages
    ]
    worst = min(usages, key=lambda u: u.occupancy)
    lines += [
        "",
        f"Lowest occupancy: {worst.occupancy:.0%} (sm_{worst.arch} {worst.dtype} `{worst.kernel}`, "
        f"{worst.registers} registers); flagged: {sum(u.flagged for u in usages)} of {len(usages)}.",
    ]
    (out_dir / "triton_resources.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument(
        "--also", nargs="+", default=[], metavar="MODULE", help="also compile these modules' aot_specs"
    )
    parser.add_argument("--out", type=Path, help="write the PTX of every kernel here")
    parser.add_argument("--report", type=Path, help="write triton_resources.md/.csv (registers, spills) here")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 if a kernel spills or has occupancy < 50%%"
    )
    args = parser.parse_args(argv)
    for folder in (args.out, args.report):
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
    compiled = compile_all(args.arch, args.dtype, args.out, args.report is not None, tuple(args.also))
    print(f"compiled {len(compiled)} kernels for sm_{', sm_'.join(map(str, args.arch))}")
    if args.report:
        command = "python -m fasthvae.ops.triton_aot " + " ".join(argv if argv is not None else sys.argv[1:])
        usages = [u for u in compiled if u is not None]
        write_report(usages, args.report, command)
        flagged = [u for u in usages if u.flagged]
        print(f"wrote {args.report / 'triton_resources.md'}: {len(flagged)} of {len(usages)} kernels flagged")
        if flagged and args.strict:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
