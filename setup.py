"""Builds fasthvae._C: the CPU kernels always, the CUDA kernels when asked or when a GPU is visible.

FASTHVAE_BUILD_CUDA=1 forces the CUDA kernels (needs nvcc), 0 skips them, auto (default)
builds them when CUDA_HOME is found and torch sees a GPU. TORCH_CUDA_ARCH_LIST picks the
architectures (default 8.0;9.0+PTX). No --use_fast_math: the CUDA noise must equal the other
backends' (precise logf/sinf/cosf/sqrtf).
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = "csrc"


def _want_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    choice = os.environ.get("FASTHVAE_BUILD_CUDA", "auto").lower()
    if choice in ("1", "true", "yes"):
        if CUDA_HOME is None:
            raise RuntimeError("FASTHVAE_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return True
    if choice in ("0", "false", "no"):
        return False
    return CUDA_HOME is not None and torch.cuda.is_available()


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = [f"{CSRC}/bindings.cpp", f"{CSRC}/gaussian_cpu.cpp"]
    # -fopenmp: at::parallel_for is OpenMP-based in the headers; without it the loops run serially.
    # -fno-builtin-sinf: else GCC fuses sinf and cosf of one angle into sincosf, which has no vector
    # variant, and the noise loop is left scalar.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-builtin-sinf", "-std=c++20"]
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
