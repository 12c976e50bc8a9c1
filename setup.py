"""Builds fasthvae._C: the CPU kernels always, the CUDA kernels when they can be built and are wanted.

FASTHVAE_BUILD_CUDA=1 asks for the CUDA kernels, 0 skips them, auto (default) builds them when a
GPU is visible. They need a CUDA build of torch and an nvcc (CUDA_HOME) of the same CUDA major
version; when that is missing, the CPU kernels are built alone and the build says why (the tests
then skip the ``cuda`` backend). TORCH_CUDA_ARCH_LIST picks the architectures (default
8.0;9.0+PTX). No --use_fast_math: the CUDA noise must equal the other backends' (precise
logf/sinf/cosf/sqrtf).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = "csrc"


def cuda_build_plan(
    choice: str, torch_cuda: str | None, nvcc_version: str | None, gpu_visible: bool
) -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and why not when they are skipped.

    ``choice``: FASTHVAE_BUILD_CUDA (``1``, ``0`` or ``auto``); ``torch_cuda``: torch.version.cuda;
    ``nvcc_version``: the toolkit's ``major.minor``, None without one."""
    choice = choice.lower()
    if choice in ("0", "false", "no"):
        return False, "FASTHVAE_BUILD_CUDA=0"
    if torch_cuda is None:
        return False, "torch is a CPU-only build"
    if nvcc_version is None:
        return False, "no CUDA toolkit found (nvcc under CUDA_HOME)"
    if nvcc_version.split(".")[0] != torch_cuda.split(".")[0]:
        return False, f"nvcc is CUDA {nvcc_version} but torch was built with CUDA {torch_cuda}"
    if choice in ("1", "true", "yes") or gpu_visible:
        return True, ""
    return False, "no GPU is visible (FASTHVAE_BUILD_CUDA=1 builds them anyway)"


def _nvcc_version(cuda_home: str | None) -> str | None:
    """``major.minor`` of ``CUDA_HOME/bin/nvcc``, None when it is missing or does not run."""
    if cuda_home is None:
        return None
    try:
        out = subprocess.run(
            [str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except OSError:
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def _want_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    choice = os.environ.get("FASTHVAE_BUILD_CUDA", "auto")
    build, why_not = cuda_build_plan(
        choice, torch.version.cuda, _nvcc_version(CUDA_HOME), torch.cuda.is_available()
    )
    if not build:
        loud = choice.lower() in ("1", "true", "yes")
        print(
            f"fasthvae build: {'WARNING: ' if loud else ''}CUDA kernels skipped: {why_not}", file=sys.stderr
        )
    return build


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = [
        f"{CSRC}/{name}.cpp"
        for name in (
            "bindings",
            "cpu_common",
            "gaussian_cpu",
            "gelu_cpu",
            "mixture_cpu",
            "multi_tensor_cpu",
            "weight_grad_cpu",
        )
    ]
    # -fopenmp: at::parallel_for is OpenMP-based in the headers; without it the loops run serially.
    # -fno-builtin-sinf: else GCC fuses sinf and cosf of one angle into sincosf, which has no vector
    # variant, and the noise loop is left scalar. -fno-trapping-math: the loops never read the
    # floating-point exception flags; without it GCC keeps a select between two computed values as a
    # branch where the ISA has no masked arithmetic (AVX2), and leaves such a loop scalar.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-builtin-sinf", "-std=c++20"]
    libraries = ["mvec"] if os.uname().machine == "x86_64" else []
    if _want_cuda():
        # +PTX: newer GPUs than sm_90 JIT-compile the PTX instead of finding no kernel image.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        return [
            CUDAExtension(
                "fasthvae._C",
                [*sources, f"{CSRC}/gaussian_cuda.cu"],
                include_dirs=[str(ROOT / CSRC)],
                define_macros=[("FASTHVAE_WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]},
                libraries=libraries,
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "fasthvae._C",
            sources,
            include_dirs=[str(ROOT / CSRC)],
            extra_compile_args=cxx,
            libraries=libraries,
            extra_link_args=["-fopenmp"],
        )
    ]


def main() -> None:
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
