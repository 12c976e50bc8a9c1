"""Compile every Triton kernel specialization ahead of time for real GPUs, with no GPU present.

``python -m fasthvae.ops.triton_aot --arch 80 90`` lowers each kernel (forward and backward, every
flag combination, float32/float16/bfloat16) to PTX and a cubin, catching what the interpreter
forgives (types, layouts, unsupported ops). Must run without ``TRITON_INTERPRET``.
"""

import argparse
import itertools
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from fasthvae.ops.reference import KL_ELEMENTWISE, KL_NONE, KL_ROWS

DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _forward_specs(dtype: str) -> Iterator[tuple[str, dict, dict]]:
    from fasthvae.ops import triton_kernels as tk

    for sample, kl_mode, prior, aligned in itertools.product(
        (False, True), (KL_NONE, KL_ELEMENTWISE, KL_ROWS), (False, True), (False, True)
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
            "seed": "i64", "inner": "i32", "blocks_per_row": "i32",
            "SAMPLE": "constexpr", "KL_MODE": "constexpr", "PRIOR": "constexpr", "ALIGNED": "constexpr",
            "BLOCK": "constexpr",
        }  # fmt: skip
        consts = {"SAMPLE": sample, "KL_MODE": kl_mode, "PRIOR": prior, "ALIGNED": aligned, "BLOCK": tk.BLOCK}
        consts.update({k: None for k, v in sig.items() if v == "constexpr" and k.endswith("_ptr")})
        yield f"forward[sample={sample},kl={kl_mode},prior={prior},aligned={aligned}]", sig, consts


def _backward_specs(dtype: str) -> Iterator[tuple[str, dict, dict]]:
    from fasthvae.ops import triton_kernels as tk

    for sample, kl, prior, rows, aligned in itertools.product((False, True), repeat=5):
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
            "seed": "i64", "inner": "i32", "blocks_per_row": "i32",
            "SAMPLE": "constexpr", "KL": "constexpr", "PRIOR": "constexpr", "GRAD_ROWS": "constexpr",
            "ALIGNED": "constexpr", "BLOCK": "constexpr",
        }  # fmt: skip
        flags = {"SAMPLE": sample, "KL": kl, "PRIOR": prior, "GRAD_ROWS": rows, "ALIGNED": aligned}
        consts = {**flags, "BLOCK": tk.BLOCK}
        consts.update({k: None for k, v in sig.items() if v == "constexpr" and k.endswith("_ptr")})
        yield f"backward[sample={sample},kl={kl},prior={prior},rows={rows},aligned={aligned}]", sig, consts


def compile_all(archs: list[int], dtypes: list[str], out_dir: Path | None = None) -> int:
    """Compile every specialization for each arch and dtype; returns the number compiled."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fasthvae.ops import triton_kernels as tk

    kernels = [(tk.gaussian_forward_kernel, _forward_specs), (tk.gaussian_backward_kernel, _backward_specs)]
    count = 0
    for arch, dtype in itertools.product(archs, dtypes):
        target = GPUTarget("cuda", arch, 32)
        for fn, specs in kernels:
            for name, sig, consts in specs(dtype):
                start = time.perf_counter()
                compiled = triton.compile(
                    ASTSource(fn=fn, signature=sig, constexprs=consts),
                    target=target,
                    options={"num_warps": tk.NUM_WARPS},
                )
                assert compiled.asm["cubin"], f"no cubin for {name}"
                if out_dir is not None:
                    stem = f"sm{arch}_{dtype}_{name}".replace("[", "_").replace("]", "").replace(",", "_")
                    (out_dir / f"{stem}.ptx").write_text(compiled.asm["ptx"])
                count += 1
                print(f"sm_{arch} {dtype:5s} {name}: ok ({time.perf_counter() - start:.1f}s)", flush=True)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--out", type=Path, help="write the PTX of every kernel here")
    args = parser.parse_args(argv)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    count = compile_all(args.arch, args.dtype, args.out)
    print(f"compiled {count} kernels for sm_{', sm_'.join(map(str, args.arch))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
