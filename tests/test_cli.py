"""The ``fasthvae`` command and ``fasthvae.load``: subcommands equal to their ``python -m`` forms,
``env``, ``--version``; a trained model in three lines, and clear errors for checkpoints that do not
fit."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fasthvae
from fasthvae import cli, hardware
from fasthvae.training.checkpoint import CheckpointError, load_checkpoint, save_atomic
from tests.helpers import SMALL

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "fasthvae"  # installed by pip from [project.scripts]


def run(*cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)


def test_the_console_script_is_installed_and_knows_its_version():
    assert SCRIPT.is_file(), "pip install -e . installs the fasthvae command"
    out = run(str(SCRIPT), "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"fasthvae {fasthvae.__version__}"


def test_the_package_metadata_takes_its_version_from_the_code():
    # pyproject.toml declares the version dynamic, read from fasthvae/version.py at install
    assert importlib.metadata.version("fasthvae") == fasthvae.__version__


SUBCOMMANDS = {  # the fasthvae subcommand -> its python -m form
    ("train",): ("-m", "fasthvae.train"),
    ("eval",): ("-m", "fasthvae.eval"),
    ("study",): ("-m", "fasthvae.study"),
    ("bench", "ops"): ("-m", "bench.bench_ops"),
    ("bench", "train"): ("-m", "bench.bench_train"),
    ("bench", "loader"): ("-m", "bench.bench_loader"),
}


def test_subcommands_are_their_python_forms():
    """Every pair's --help, the twelve processes started at once (each spends seconds importing)."""

    def start(*cmd: str) -> subprocess.Popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    procs = {
        sub: (start(str(SCRIPT), *sub, "--help"), start(sys.executable, *module_form, "--help"))
        for sub, module_form in SUBCOMMANDS.items()
    }
    for sub, (ours, theirs) in procs.items():
        (ours_out, ours_err), (theirs_out, _) = ours.communicate(timeout=300), theirs.communicate(timeout=300)
        assert ours.returncode == theirs.returncode == 0, (sub, ours_err[-1000:])
        assert ours_out == theirs_out, sub


def test_unknown_subcommands_and_missing_benches(capsys, monkeypatch, tmp_path):
    assert cli.main(["frobnicate"]) == 2
    assert "fasthvae train" in capsys.readouterr().err
    assert cli.main(["bench", "gpu"]) == 2
    monkeypatch.setattr(cli, "BENCH_DIR", tmp_path)
    assert cli.main(["bench", "ops"]) == 2
    assert "the benchmarks live in the source checkout" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, level",
    [
        ({"avx2", "fma", "avx512f", "avx512_bf16"}, "AVX-512 + bf16"),
        ({"avx2", "avx512f", "amx_bf16"}, "AVX-512 + bf16"),
        ({"avx2", "avx512f", "avx512bw"}, "AVX-512"),
        ({"avx2", "fma", "f16c"}, "AVX2"),
        ({"sse4_2"}, ""),
        ({"fp", "asimd", "bf16"}, ""),
    ],
)
def test_the_machine_line_names_the_simd_level_figures_differ_by(monkeypatch, flags, level):
    assert hardware.simd_level(flags) == level
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    line = hardware.machine()
    assert line.startswith(
        f"{hardware.cpu_name()} ({level + ', ' if level else ''}{torch.get_num_threads()} threads)"
    )


def test_the_machine_line_names_an_isa_cap_and_the_cpu_under_it(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "fma", "avx512f", "avx512_bf16"})
    for name in hardware.ISA_CAP_ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(hardware.ISA_CAP_ENV, "avx2")
    assert "(AVX2 by ATEN_CPU_CAPABILITY=avx2 on an AVX-512 + bf16 CPU, " in hardware.machine()
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")  # every cap set is named: a partial cap shows
    assert "by ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2 on an AVX-512" in hardware.machine()


def test_env_names_what_a_bug_report_needs(capsys):
    assert cli.main(["env"]) == 0
    text = capsys.readouterr().out
    for needle in (
        "fasthvae ",
        "torch: ",
        "triton: ",
        "nvidia-dali-cuda130: ",
        "torch-fidelity: ",
        "C++ extension: loaded",
        "CPU ISA path: ",
        "ops backend selected: ",
        "runs on cpu: ",
    ):
        assert needle in text, needle


def test_env_names_the_isa_caps_that_are_set(monkeypatch, capsys):
    for name in hardware.ISA_CAP_ENVS:
        monkeypatch.delenv(name, raising=False)
    cli.main(["env"])
    assert "ISA caps" not in capsys.readouterr().out
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # read by oneDNN at its first primitive, not here
    cli.main(["env"])
    assert "  ISA caps: ONEDNN_MAX_CPU_ISA=AVX2\n" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--data", data, "--out", str(out), *SMALL, "--epochs", "1", "--limit-train", "64"]
    assert cli.main([*argv, "--no-compile", "--no-tensorboard"]) == 0, "fasthvae train runs the trainer"
    return out


def test_load_a_trained_model_in_three_lines(trained, data):
    model = fasthvae.load(trained)
    x = torch.rand(5, 3, 32, 32)
    assert not model.training
    assert model.sample(4, temperature=0.5).shape == (4, 3, 32, 32)
    assert model.reconstruct(x).shape == x.shape
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 4, 8, 8), "HVAE: q(z1 | x)"
    elbo = model.elbo(x)
    assert elbo.shape == (5,) and torch.isfinite(elbo).all() and (elbo < 0).all()
    half = fasthvae.load(trained / "checkpoint.pt", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_a_checkpoint_that_does_not_fit_names_what_differs(trained, tmp_path):
    state = load_checkpoint(trained / "checkpoint.pt")
    weights = state["model"]
    first, last = next(iter(weights)), list(weights)[-1]
    weights[last] = torch.zeros(3, 3)
    weights["renamed." + first] = weights.pop(first)
    state["fasthvae_version"] = "9.9.9"
    save_atomic(state, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError) as err:
        fasthvae.load(tmp_path)
    message = str(err.value)
    assert "written by fasthvae 9.9.9" in message and f"fasthvae {fasthvae.__version__}" in message
    assert f"missing: {first}" in message and f"unexpected: renamed.{first}" in message
    assert f"{last} (3, 3) vs" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: scripts/gpu_check.sh runs the check")
def test_the_gpu_self_check_says_there_is_no_gpu(tmp_path):
    out = run("bash", "scripts/gpu_check.sh", str(tmp_path / "report"), env={"PYTHON": sys.executable})
    assert out.returncode == 1
    assert "no CUDA GPU is visible to torch" in out.stderr and not (tmp_path / "report").exists()
