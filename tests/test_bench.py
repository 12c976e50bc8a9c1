"""The benchmark scripts run end to end (tiny sizes) and write the tables they promise.

Only that they work and report every implementation; speed goals live in the benchmarks' output.
"""

import argparse
import csv
import importlib.util
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import bench_probe, bench_threads, bench_waits, machine_scale
from bench.bench_threads import amdahl_fit
from bench.bench_threads import report_rows as threads_report_rows
from bench.bench_train import (
    PLAIN,
    PYTHON_WRAPPER,
    Variant,
    against_best_switch,
    against_python_wrapper,
    build_variants,
    device_busy,
    left_out,
    paired,
    variants,
)
from bench.report import inductor_environment
from fasthvae.data.dali import dali_available
from fasthvae.data.torch_loader import PREFETCH_FACTOR
from fasthvae.hardware import usable_cpu_flags
from fasthvae.train import TrainConfig
from fasthvae.training import speed
from tests.helpers import make_compilation_fail, needs_onednn

ROOT = Path(__file__).resolve().parents[1]


def run_bench(
    script: str, *args: str, fails: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run as a user would: no Triton interpreter (which tests/conftest.py turns on), ``env`` added.
    ``fails``: the run must exit with an error (its output captured for the test to read)."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (env or {})
    module = "bench." + script.removesuffix(".py")
    command = [sys.executable, "-m", module, *args]
    done = subprocess.run(
        command, check=not fails, cwd=ROOT, env=environment, capture_output=fails, text=True
    )
    assert not fails or done.returncode != 0, f"{script} {' '.join(args)} did not fail"
    return done


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bench-data") / "tiny.npz"
    rng = np.random.default_rng(0)
    x, xt = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (512, 64))
    np.savez(path, x_train=x, y_train=np.zeros(512, np.int64), x_test=xt, y_test=np.zeros(64, np.int64))
    return str(path)


def test_bench_ops(tmp_path):
    """A Gaussian op on a latent and the mixture likelihood on a CIFAR-10 decoder output: eager,
    compiled and fused timed (the mixture in one pass too); the mixture keeps 0.25 MiB for backward
    at batch 32 (two float32 per pixel), in one pass its gradient (100 float32 per pixel), and is on
    paper at 420 bytes a pixel forward, 824 backward."""
    run_bench("bench_ops.py", "--shapes", "vae-latent", "cifar-b32", "--ops", "sample_and_kl-prior",
              "mixture-nll", "--repeats", "1", "--out", str(tmp_path))  # fmt: skip
    rows = read_rows(tmp_path / "ops_cpu_float32.csv")
    for op, shape in (("sample_and_kl-prior", "vae-latent"), ("mixture-nll", "cifar-b32")):
        ours = [r for r in rows if r["op"] == op]
        assert {r["shape"] for r in ours} == {shape}
        one_pass = {"fasthvae-cpu-one-pass"} if op == "mixture-nll" else set()
        assert {r["impl"] for r in ours} == {"eager", "compiled", "fasthvae-cpu"} | one_pass
        assert len(ours) == 3 * (3 + len(one_pass))  # forward, backward, forward+backward each
        fused = next(r for r in ours if r["impl"] == "fasthvae-cpu" and r["pass"] == "forward+backward")
        assert float(fused["median_ms"]) > 0 and float(fused["speedup_vs_compiled"]) > 0
    assert "| sample_and_kl-prior | vae-latent |" in (tmp_path / "ops_cpu_float32.md").read_text()
    mixture = {r["impl"]: r for r in rows if r["op"] == "mixture-nll"}
    assert float(mixture["fasthvae-cpu"]["memory_MiB"]) == round(2 * 4 * 32 * 32 * 32 / 2**20, 2)
    assert float(mixture["fasthvae-cpu-one-pass"]["memory_MiB"]) == round(100 * 4 * 32 * 32 * 32 / 2**20, 2)
    if importlib.util.find_spec("triton"):
        (paper,) = [r for r in read_rows(tmp_path / "ops_on_paper_float32.csv") if r["op"] == "mixture-nll"]
        pixels = 32 * 32 * 32
        assert float(paper["forward_MB"]) == round(420 * pixels / 1e6, 3)
        assert float(paper["backward_MB"]) == round(824 * pixels / 1e6, 3)
        assert int(paper["programs"]) == pixels // 128


def test_bench_ops_writes_the_gpu_on_paper(tmp_path):
    """Bytes the fused kernels move (5 tensors forward, 9 backward for sample_and_kl with a prior,
    plus float32 row sums), ideal times at HBM bandwidth, the AOT registers of the kernels."""
    pytest.importorskip("triton")
    run_bench("bench_ops.py", "--on-paper-only", "--shapes", "vae-latent", "--ops", "sample_and_kl-prior",
              "--dtype", "bfloat16", "--out", str(tmp_path))  # fmt: skip
    (row,) = read_rows(tmp_path / "ops_on_paper_bfloat16.csv")
    tensor, sums = 256 * 128 * 2, 256 * 4
    assert float(row["forward_MB"]) == round((5 * tensor + sums) / 1e6, 3)
    assert float(row["backward_MB"]) == round((9 * tensor + sums) / 1e6, 3)
    assert float(row["H100 SXM forward_us"]) == round((5 * tensor + sums) / 3.35e12 * 1e6, 2)
    assert float(row["H200 forward_us"]) == round((5 * tensor + sums) / 4.3e12 * 1e6, 2)
    assert int(row["programs"]) == 256 // 8  # 8 rows of 128 per 1,024-element program
    assert "sm_80: forward" in row["triton"] and "sm_90: forward" in row["triton"], row["triton"]
    assert not list(tmp_path.glob("ops_cpu_*"))  # no timing with --on-paper-only


def test_bench_loader(tmp_path, images):
    run_bench("bench_loader.py", "--data", images, "--batch-size", "64", "--epochs", "1", "--workers", "1",
              "--out", str(tmp_path))  # fmt: skip
    rows = read_rows(next(tmp_path.glob("*.csv")))
    expected = {"torch", "resident"} | ({"dali"} if dali_available() else set())  # no DALI: GPU machines
    assert expected <= {r["loader"] for r in rows}
    assert {r["layout"] for r in rows} == {"channels_last"}, "batches as the trainer takes them"


def test_bench_loader_feeding_the_step(tmp_path, images):
    """--feed: both array loaders feed the compiled step of a model, paired rounds, the DataLoader
    the reference (1.0 against itself, faster in no round)."""
    run_bench("bench_loader.py", "--data", images, "--batch-size", "8", "--feed", "hvae", "--rounds", "2",
              "--steps", "2", "--warmup", "1", "--workers", "1", "--out", str(tmp_path))  # fmt: skip
    rows = read_rows(tmp_path / "loader_feed_cpu_b8.csv")
    assert [(r["model"], r["loader"]) for r in rows] == [("hvae", "torch"), ("hvae", "resident")]
    assert (float(rows[0]["time_vs_first"]), rows[0]["faster_rounds"]) == (1.0, "0")
    assert all(float(r["step_ms_median"]) > 0 and len(r["windows_ms"].split()) == 2 for r in rows)
    assert "| hvae | 8 | resident |" in (tmp_path / "loader_feed_cpu_b8.md").read_text()
    # The A/A run: one loader twice, told apart.
    run_bench("bench_loader.py", "--data", images, "--batch-size", "8", "--feed", "hvae", "--rounds", "1",
              "--steps", "1", "--warmup", "1", "--feed-loaders", "resident", "resident",
              "--out", str(tmp_path))  # fmt: skip
    assert [r["loader"] for r in read_rows(tmp_path / "loader_feed_cpu_b8.csv")] == ["resident", "resident 2"]


def test_bench_train_windows_each_iterate_their_loader_afresh(tmp_path, images):
    """A timed window opens its own iteration of its variant's loader (the epoch's first batch
    again), draws the batches the DataLoader keeps in flight untimed, then its steps, and closes the
    iteration: no worker process outlives the window."""
    config = TrainConfig(
        model="vae", channels=8, latent=16, batch_size=8, data=images, loader="torch", workers=1,
        compile=False, channels_last=False, fused_optimizer=False, speed="fixed", out=str(tmp_path),
    )  # fmt: skip
    variant = Variant("plain", config, fused_ops=False, warmup=1, bare=False)
    draws, real_next = [], variant.feed.next

    def next_batch():
        draws.append((real_next(), len(multiprocessing.active_children())))
        return draws[-1][0]

    variant.feed.next = next_batch
    for _ in range(2):
        variant.time_window(3)
        assert not multiprocessing.active_children(), "the window's workers stopped with it"
    in_flight = variant.feed.in_flight
    assert in_flight == PREFETCH_FACTOR and len(draws) == 2 * (in_flight + 3) and len(variant.windows) == 2
    assert all(children == 1 for _, children in draws), "each window's own worker"
    first, second = draws[0][0], draws[in_flight + 3][0]
    assert torch.equal(first, second), "each window starts the epoch afresh"


def test_bench_train(tmp_path, images):
    variants = ["bare", "plain", "+fused-ops", "+compile"]
    run_bench("bench_train.py", "--data", images, "--batch-size", "8", "--warmup", "1", "--steps", "2",
              "--repeats", "2", "--peak-repeats", "1", "--only", *variants,
              "--out", str(tmp_path))  # fmt: skip
    rows = read_rows(tmp_path / "train_cpu_hvae.csv")
    assert [r["variant"] for r in rows] == variants
    bare, plain, fused, compiled = rows
    # Ratios are taken round by round: plain against itself is 1 in every round, faster in none.
    assert (float(plain["speedup_vs_plain"]), plain["faster_rounds"]) == (1.0, "0")
    assert all(0 <= int(r["faster_rounds"]) <= 2 for r in rows)
    assert (
        plain["fused_ops_share"] == bare["fused_ops_share"] == "" and 0 < float(fused["fused_ops_share"]) < 1
    )
    assert plain["compile_s"] == plain["graph_breaks"] == "", "eager: no compile figures"
    assert float(compiled["compile_s"]) > 0 and compiled["graph_breaks"] == "0", "the step is one graph"
    # On the machine's scale: one FLOP count for the model and batch, GFLOP/s = FLOPs x images/s.
    assert len({r["mflop_per_image"] for r in rows}) == 1 and float(plain["mflop_per_image"]) > 100
    for row in rows:
        gflops = float(row["mflop_per_image"]) * float(row["images_per_s"]) / 1e3
        assert float(row["gflops"]) == pytest.approx(gflops, rel=0.01, abs=0.1)
        assert float(row["share_of_sgemm"]) > 0 and float(row["share_of_conv"]) > 0
    report = (tmp_path / "train_cpu_hvae.md").read_text()
    assert "2 rounds" in report and "fp32 sgemm 2048^2" in report and "(rounds: " in report


def test_bench_train_compares_round_by_round():
    # Round 3 ran slow for everyone: per-round ratios see through it, a ratio of medians would not.
    plain, fast = [1.0, 1.0, 2.0, 1.0], [0.5, 0.5, 1.0, 0.5]
    assert paired(fast, plain) == (2.0, 4) and paired(plain, plain) == (1.0, 0)
    assert paired([1.1, 0.9, 2.2, 1.25], plain) == (0.909, 1)
    rows = [
        SimpleNamespace(name="plain", windows=[3.0, 3.0, 3.0]),
        SimpleNamespace(name="+amp", windows=[2.5, 2.5, 2.5]),
        SimpleNamespace(name="+compile", windows=[2.0, 2.2, 1.8]),
        SimpleNamespace(name="fasthvae", windows=[2.1, 2.0, 1.9]),
    ]
    line = against_best_switch(rows)
    assert "`+compile`: 0.952x, faster in 1 of 3 rounds" in line
    assert against_best_switch(rows[:3]) == "" == against_best_switch([rows[0], rows[3]])


def test_bench_train_sets_the_python_wrapper_beside_the_cpu_default():
    """On CPU the fasthvae row compiles as the trainer does (the C++ wrapper, no option given) and
    one more row with the python wrapper shows what that gains; on CUDA there is no such row."""
    cpu = variants("cpu", "deep")
    assert "compile_wrapper" not in cpu["fasthvae"][0]
    assert cpu[PYTHON_WRAPPER][0] == cpu["fasthvae"][0] | {"compile_wrapper": "python"}
    assert PYTHON_WRAPPER not in variants("cuda", "deep")
    rows = [
        SimpleNamespace(name="fasthvae", windows=[1.0, 1.1, 0.9]),
        SimpleNamespace(name=PYTHON_WRAPPER, windows=[1.05, 1.0, 1.0]),
    ]
    line = against_python_wrapper(rows)
    assert "python wrapper, `fasthvae+python-wrapper`: 1.05x, faster in 2 of 3 rounds" in line
    assert against_python_wrapper(rows[:1]) == "" == against_python_wrapper(rows[1:])


def test_bench_train_leaves_out_a_variant_that_fails_to_compile(tmp_path, images, monkeypatch):
    """A compiler that crashes on this machine costs its variant only: it is named with its error
    and the others are built; when every variant fails, the first error is raised."""
    make_compilation_fail(monkeypatch)

    def config(name: str, **switches) -> TrainConfig:
        return TrainConfig(model="hvae", batch_size=8, data=images, limit_train=64, epochs=2,
                           out=str(tmp_path / name), **(PLAIN | switches))  # fmt: skip

    configs = {"plain": config("plain"), "+compile": config("compile", compile=True)}
    built, failed = build_variants(configs, {"plain": False, "+compile": False}, warmup=1)
    assert [v.name for v in built] == ["plain"] and list(failed) == ["+compile"]
    assert (
        failed["+compile"].startswith("BackendCompilerFailed") and "the compiler broke" in failed["+compile"]
    )
    assert "`+compile` (BackendCompilerFailed" in left_out(failed) and left_out({}) == ""
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="the compiler broke"):
        build_variants({"+compile": configs["+compile"]}, {"+compile": False}, warmup=1)
    torch._dynamo.reset()


def test_device_busy_merges_overlapping_kernels_and_leaves_out_the_host():
    """Busy time is the union of the device's spans (two streams at once count once); host
    events, however long, are not the device's."""

    def event(device, start, end):
        return SimpleNamespace(device_type=device, time_range=SimpleNamespace(start=start, end=end))

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    spans = [event(cuda, 0, 100), event(cuda, 50, 150), event(cuda, 400, 500), event(cpu, 0, 10_000)]
    profile = SimpleNamespace(events=lambda: spans)
    assert device_busy(profile, wall_s=1e-3) == pytest.approx(0.25)  # 250 of 1,000 us
    assert device_busy(SimpleNamespace(events=lambda: [spans[3]]), wall_s=1e-3) == 0.0


def test_bench_train_deep(tmp_path, images):
    run_bench("bench_train.py", "--model", "deep", "--data", images, "--batch-size", "4", "--warmup", "1",
              "--steps", "1", "--repeats", "1", "--only", "+fused-ops", "--top-ops", "3",
              "--out", str(tmp_path))  # fmt: skip
    rows = read_rows(tmp_path / "train_cpu_deep_small.csv")
    assert rows[0]["model"] == "deep" and 0 < float(rows[0]["fused_ops_share"]) < 1
    top = read_rows(tmp_path / "train_cpu_deep_small_top_ops.csv")
    assert [(r["variant"], r["rank"]) for r in top] == [("+fused-ops", str(rank)) for rank in (1, 2, 3)]
    times = [float(r["self_ms_per_step"]) for r in top]
    assert times == sorted(times, reverse=True) and times[-1] > 0, "the most self time first"
    assert 0 < sum(float(r["share"]) for r in top) <= 1
    # The whole window by resolution: the model's scales, smallest first, then the rest.
    rows = read_rows(tmp_path / "train_cpu_deep_small_by_resolution.csv")
    names = [r["resolution"] for r in rows]
    assert {"1x1", "4x4", "8x8", "16x16", "32x32"} <= set(names) and names[-1] == "other"
    assert names.index("1x1") < names.index("4x4") < names.index("32x32")
    assert sum(float(r["share"]) for r in rows) == pytest.approx(1, abs=0.01)


def test_bench_allocator(tmp_path, images):
    run_bench("bench_allocator.py", "--model", "vae", "--data", images, "--batch-size", "4", "--no-compile",
              "--warmup", "1", "--steps", "1", "--rounds", "2", "--default-windows", "1",
              "--out", str(tmp_path))  # fmt: skip
    rows = read_rows(tmp_path / "allocator_cpu_vae.csv")
    assert [r["setting"].split(" ")[0] for r in rows] == ["glibc's", "emulated:", "freed"]
    assert all(float(r["ms_per_step"]) > 0 and len(r["windows_ms"].split()) >= 1 for r in rows)
    assert rows[2]["vs_emulated"].endswith("/2)") and not rows[0]["vs_emulated"]


def test_bench_threads(tmp_path, images):
    run_bench("bench_threads.py", "--model", "vae", "--data", images, "--batch-sizes", "2", "4",
              "--no-compile", "--threads", "1", "2", "--rounds", "1", "--warmup", "1", "--steps", "1",
              "--windows", "1", "--out", str(tmp_path))  # fmt: skip
    rows = read_rows(tmp_path / "threads_cpu_vae_b2-4.csv")
    assert [(r["batch"], r["threads"][:9]) for r in rows] == [
        ("2", "1"), ("2", "2"), ("2", "fit: S = "), ("2", "fit on th"),
        ("4", "1"), ("4", "2"), ("4", "fit: S = "), ("4", "fit on th"),
    ]  # fmt: skip
    for fit, counts in ((rows[2], rows[:2]), (rows[6], rows[4:6])):
        assert all(float(r["ms_per_step"]) > 0 and float(r["sgemm_gflops"]) > 0 for r in counts)
        assert counts[1]["speedup"].endswith("/1)") and not counts[0]["speedup"]
        # the fit passes through both medians (2 thread counts); on a loaded machine P may come out <= 0
        serial, parallel = map(float, re.match(r"fit: S = (\S+) ms, P = (\S+) ms", fit["threads"]).groups())
        for n, r in zip((1, 2), counts, strict=True):
            assert serial + parallel / n == pytest.approx(float(r["ms_per_step"]), abs=0.11)
        assert (fit["ms_per_step"] == "") == (parallel <= 0)


def test_bench_threads_takes_one_of_its_batch_flags(capsys):
    with pytest.raises(SystemExit):
        bench_threads.main(["--batch-size", "4", "--batch-sizes", "2", "4"])
    assert "give --batch-size or --batch-sizes, not both" in capsys.readouterr().err


def test_bench_threads_says_when_more_threads_were_not_faster():
    runs = {n: [{"windows": [t], "sgemm": 100.0}] for n, t in ((1, 0.010), (2, 0.012))}
    fit, on_sgemm = threads_report_rows(runs, flops_per_image=1e6, batch=4)[-2:]
    assert fit["threads"].endswith("more threads were not faster") and fit["ms_per_step"] is None
    assert on_sgemm["threads"].endswith("the sgemm was not faster on more threads")
    assert on_sgemm["ms_per_step"] is None


def test_bench_threads_fits_the_cores_the_sgemm_got():
    """Where the sgemm runs 1.6x as fast on 2 threads, the second fit takes 1.6 cores at 2 threads:
    a step of S + P / 1.6 gives back S, P, and P / 1.6 as the step with S zero; the fit on thread
    counts counts the missing 0.4 core in S."""
    serial, parallel = 0.030, 0.146
    cores = {1: 1.0, 2: 1.6}
    runs = {n: [{"windows": [serial + parallel / c], "sgemm": 100.0 * c}] for n, c in cores.items()}
    on_counts, on_sgemm = threads_report_rows(runs, flops_per_image=1e6, batch=4)[-2:]
    fit = "fit on the sgemm's cores (1.60 at 2): S = 30.0 ms, P = 146.0 ms; at 2, S zero"
    assert on_sgemm["threads"] == fit
    assert on_sgemm["ms_per_step"] == pytest.approx(1000 * parallel / 1.6)
    assert on_counts["threads"].startswith("fit: S = 66.5 ms, P = 109.5 ms")


def test_amdahl_fit_recovers_the_serial_and_parallel_parts():
    serial, parallel = amdahl_fit([1, 2, 4], [0.04 + 0.09 / n for n in (1, 2, 4)])
    assert serial == pytest.approx(0.04, abs=1e-12) and parallel == pytest.approx(0.09, abs=1e-12)
    with pytest.raises(ValueError, match="two different thread counts"):
        amdahl_fit([2, 2], [0.1, 0.1])


def test_bench_waits_finds_where_the_main_thread_runs_alone():
    """perf's samples: the main thread (tid == pid) matched with the worker's nearest sample; it
    runs alone where the worker is in the OpenMP runtime, and a sample with no worker sample near
    it is left out."""
    inductor = "/tmp/torchinductor_u/ab/cabc.main.so"
    gomp = "/x/torch/lib/libgomp.so.1"
    lines = [
        f"   100/100   5.000000:   7f01 kernel ({inductor})",
        f"   100/101   5.000020:   7f02 kernel ({inductor})",
        "   100/100   5.001000:   7f03 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)",
        f"   100/101   5.001030:   7f04 [unknown] ({gomp})",
        "   100/100   5.002000:   7f05 _int_malloc (/usr/lib/x86_64-linux-gnu/libc.so.6)",
        f"   100/101   5.002050:   7f06 [unknown] ({gomp})",
        "   100/100   5.004000:   7f07 [unknown] (/tmp/perf-100.map)",
        "not a sample line",
    ]
    samples = bench_waits.parse(lines)
    assert len(samples) == 7
    found = bench_waits.waits(samples, match_s=100e-6)
    assert found["matched"] == 3 and found["worker_threads"] == 1
    assert found["alone"] == {"Python and torch's bindings": 1, "libc (malloc, free, copies)": 1}
    assert found["main"]["oneDNN's JIT kernels"] == 1 and found["workers"][bench_waits.OPENMP] == 2
    rows = {r["code"]: r for r in bench_waits.report_rows(found)}
    inductor_row = rows["Inductor's kernels"]
    assert inductor_row["main_thread"] == 0.25 and inductor_row["workers"] == 1 / 3
    assert rows["all"]["main_alone"] == 1.0
    # Sleef's vector math in libtorch_cpu is its own class, not ATen's
    assert bench_waits.code_class("Sleef_expf16_u10 (/x/torch/lib/libtorch_cpu.so)").startswith("vector math")
    assert bench_waits.code_class("at::empty (/x/torch/lib/libtorch_cpu.so)") == "ATen and c10"


def test_tables_name_inductors_settings_from_the_environment(monkeypatch):
    for key in [k for k in os.environ if k.startswith("TORCHINDUCTOR_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/x")  # a location, which Inductor sets itself
    assert inductor_environment() == ""
    monkeypatch.setenv("TORCHINDUCTOR_CPP_WRAPPER", "1")
    expected = " Inductor's settings from the environment: `TORCHINDUCTOR_CPP_WRAPPER=1`."
    assert inductor_environment() == expected


def test_bench_waits_names_a_missing_perf(monkeypatch):
    monkeypatch.setattr(bench_waits.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="needs Linux perf"):
        bench_waits.main([])


def test_bench_budget_predicts_a_row_against_its_budget_row(tmp_path, images):
    run_bench("bench_budget.py", "--rows", "deep-z16-b16-e12-rp-klb-b09", "--data", images,
              "--epochs", "2", "--no-compile", "--rounds", "2", "--window-seconds", "0.01",
              "--out", str(tmp_path))  # fmt: skip
    vae, deep = read_rows(tmp_path / "budget_cpu_deep-z16-b16-e12-rp-klb-b09.csv")
    assert (vae["row"], vae["steps_per_run"], vae["share_of_budget"]) == ("vae", "8", "")  # 2 x 512/128
    assert (deep["epochs"], deep["steps_per_run"]) == ("12", "384")  # the row's own epochs, batch 16
    windows = {}
    for r, counted in ((vae, 0.0), (deep, float(deep["compile_s"]))):  # the budgeted row's compilation
        windows[r["row"]] = [float(w) for w in r["windows_ms"].split()]
        assert float(r["ms_per_step"]) == pytest.approx(statistics.median(windows[r["row"]]), abs=0.05)
        minutes = (int(r["steps_per_run"]) * float(r["ms_per_step"]) / 1000 + counted) / 60
        assert float(r["predicted_minutes"]) == pytest.approx(minutes, rel=1e-3)
    compiled = float(deep["compile_s"])
    shares = [
        (384 * d / 1000 + compiled) / (8 * v / 1000)
        for d, v in zip(windows[deep["row"]], windows["vae"], strict=True)
    ]
    share, rounds = deep["share_of_budget"].split()
    assert float(share) == pytest.approx(statistics.median(shares), rel=2e-3)
    assert rounds == f"({sum(s <= 1 for s in shares)}/2)"


def test_bench_multi_tensor(tmp_path):
    run_bench("bench_multi_tensor.py", "--model", "vae", "--rounds", "2", "--calls", "1", "--no-compile",
              "--out", str(tmp_path))  # fmt: skip
    rows = read_rows(tmp_path / "multi_tensor_vae.csv")
    assert [(r["op"], r["impl"]) for r in rows] == [
        (op, impl) for op in ("norms", "scale", "ema", "step", "adamw") for impl in ("eager", "fasthvae")
    ]
    assert all(float(r["median_ms"]) > 0 and float(r["share_of_copy"]) > 0 for r in rows)
    assert {r["speedup_vs_eager"] for r in rows if r["impl"] == "eager"} == {"1.0"}


@needs_onednn
def test_bench_weight_gradients(tmp_path):
    """Every convolution shape of the deep model's step (the cells' grouped 3x3s among them), with its
    count, timed four ways (the BLAS's products for ungrouped 1x1 kernels only); fasthvae's kernel
    gives oneDNN's gradients to float32 rounding; the last two rows sum the step's ungrouped 1x1
    calls and all its calls."""
    run_bench("bench_weight_gradients.py", "--batch-size", "2", "--calls", "1", "--rounds", "1",
              "--out", str(tmp_path))  # fmt: skip
    *rows, one_by_one, total = read_rows(tmp_path / "weight_gradients_small.csv")
    assert len(rows) > 10 and all(r["shape"].startswith("2x") for r in rows)
    kernels = {r["shape"].split(", ")[1] for r in rows}
    assert kernels == {"1x1", "3x3"}
    assert any(r["shape"].endswith(", 3x3, 2 groups") for r in rows)
    assert (one_by_one["shape"], total["shape"]) == ("the step's ungrouped 1x1 calls", "the step's calls")
    assert int(total["calls_per_step"]) == sum(int(r["calls_per_step"]) for r in rows)
    ones = [r for r in rows if r["shape"].endswith("1x1")]
    assert int(one_by_one["calls_per_step"]) == sum(int(r["calls_per_step"]) for r in ones)
    for row in rows:
        timed = ("onednn", "matmul", "fasthvae", "aten") if row in ones else ("onednn", "fasthvae", "aten")
        assert all(float(row[f"{impl}_us"]) > 0 for impl in timed)
        assert row in ones or row["matmul_us"] == ""
        assert all(float(d) < 1e-5 for d in row["rel_diff_weight_bias"].split(", "))
    assert total["matmul_us"] == "" and float(one_by_one["matmul_us"]) > 0
    assert (tmp_path / "weight_gradients_small.md").exists()


def test_bench_onednn_calls_names_the_missing_onednn(tmp_path):
    done = run_bench("bench_onednn_calls.py", "--onednn", str(tmp_path), "--out", str(tmp_path), fails=True)
    assert "no standalone oneDNN under" in done.stderr and "pip install onednn-cpu-gomp" in done.stderr
    assert not list(tmp_path.glob("onednn_calls*"))


@needs_onednn
def test_bench_onednn_calls_names_a_dtype_onednn_lacks(tmp_path):
    args = ["--dtype", "bfloat16", "--out", str(tmp_path)]
    done = run_bench("bench_onednn_calls.py", *args, fails=True, env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert (
        "oneDNN has no bfloat16 convolution on this CPU" in done.stderr and "--dtype float32" in done.stderr
    )
    assert not list(tmp_path.glob("onednn_calls*"))


@needs_onednn
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bench_onednn_calls(tmp_path, dtype):
    if dtype == "bfloat16" and "avx512bw" not in usable_cpu_flags():
        pytest.skip("oneDNN 3.2 has no bf16 convolution below AVX-512")
    args = ["--dtype", dtype, "--calls", "2", "--rounds", "1", "--out", str(tmp_path)]
    run_bench("bench_onednn_calls.py", *args)
    rows = read_rows(tmp_path / f"onednn_calls_{dtype}.csv")
    assert len(rows) == 8
    for row in rows:
        assert all(
            float(row[f"{impl}_us"]) > 0
            for impl in ("aten_forward", "direct_forward", "aten_backward", "direct_backward")
        )
        # The direct primitives compute what ATen's do. On an AVX-512 bf16 CPU the outputs and input
        # gradients are equal, or within float32 rounding (another oneDNN may pick other kernels
        # elsewhere: one bf16 step of the largest value allowed); the weight and bias gradients, f32
        # against ATen's bf16, differ by 0.1-0.3% of the largest there (bf16 rounding and another
        # order of accumulation), and are equal in float32.
        grad_x, grad_w, grad_b = (float(v) for v in row["grad_rel_diffs"].split(", "))
        assert float(row["forward_rel_diff"]) <= 2**-8 and grad_x <= 2**-8
        assert grad_w <= 2**-7 and grad_b <= 2**-7
        if dtype == "float32":
            assert max(float(row["forward_rel_diff"]), grad_x, grad_w, grad_b) <= 2**-20


@pytest.mark.slow  # four compiles of the step: ~1 min on 2 cores
def test_bench_recompile(tmp_path, images):
    run_bench("bench_recompile.py", "--model", "vae", "--data", images, "--batch-size", "4",
              "--odd-batch", "3", "--steps", "1", "--repeats", "1", "--out", str(tmp_path))  # fmt: skip
    rows = read_rows(tmp_path / "recompile_cpu_vae.csv")
    assert [r["mode"].split(" (")[0] for r in rows] == ["automatic dynamic", "static"]
    for row in rows:
        assert all(
            float(row[k]) > 0 for k in ("first_step_s", "step_ms_before", "odd_batch_step_s", "step_ms_after")
        )


@pytest.mark.parametrize(
    ("rates", "expected"), [((10.0, 20.0), (20.0, "channels_last")), ((30.0, 20.0), (30.0, "NCHW"))]
)
def test_conv_peak_is_the_faster_layout(monkeypatch, rates, expected):
    """The conv peak runs the conv in both layouts, each with its input and gradient laid out so,
    and keeps the faster one with its name."""
    seen = []

    def rate(step, device, repeats):
        _, x, grad = step.args
        fmt = torch.channels_last if len(seen) else torch.contiguous_format
        assert x.is_contiguous(memory_format=fmt) and grad.is_contiguous(memory_format=fmt)
        step()  # the step runs: a forward and a backward into x.grad
        assert x.grad is not None
        seen.append(fmt)
        return rates[len(seen) - 1]

    monkeypatch.setattr(machine_scale, "_step_gflops", rate)
    shape = machine_scale.ConvShape(3, 5, (3, 3), (1, 1), (1, 1), 1, (6, 6))
    assert machine_scale.conv_gflops(shape, 2, torch.device("cpu")) == expected
    assert len(seen) == 2


def probe_record(probe_s: float, windows: list[int], loader: str = "resident") -> dict:
    """A probe's record as ``bench_probe``'s child reports it: candidates with these many windows."""
    candidates = [{"first_step_s": 2.0, "step_ms": [100.0] * n} for n in windows]
    return {
        "choice": {"compile": True, "loader": loader},
        "probe_s": probe_s,
        "stage_s": {"switches": probe_s - 5, "loader": 4.0},
        "candidates": [*candidates, {"onednn_conv": True, "step_ms": [90.0]}],  # the chosen step reused
        "device": "cpu",
    }


def test_bench_probe_reports_each_round_and_the_median(tmp_path, monkeypatch):
    records = iter(
        [probe_record(40.0, [4, 1, 2]), probe_record(50.0, [1, 1, 1]), probe_record(45.0, [1, 1, 1])]
    )
    monkeypatch.setattr(bench_probe, "run_child", lambda args: next(records))
    bench_probe.main(["--rounds", "3", "--cold", "--out", str(tmp_path)])
    rows = read_rows(tmp_path / "probe_cpu_deep_small_b32_cold.csv")
    assert [r["round"] for r in rows] == ["1", "2", "3", "median"]
    assert [float(r["probe_s"]) for r in rows] == [40.0, 50.0, 45.0, 45.0]
    assert [float(r["loader_s"]) for r in rows] == [4.0] * 4
    assert rows[0]["first_steps_s"] == "6.0", "the reused step took no first step"
    assert [r["windows"] for r in rows] == ["8 of 16", "4 of 16", "4 of 16", ""]
    assert rows[-1]["choice"] == "the same" and rows[0]["choice"] == "compile on, loader resident"
    records = iter([probe_record(40.0, [1]), probe_record(40.0, [1], loader="torch")])
    bench_probe.main(["--rounds", "2", "--out", str(tmp_path)])
    assert read_rows(tmp_path / "probe_cpu_deep_small_b32.csv")[-1]["choice"] == "differs"


def test_bench_probe_child_probes_as_the_trainer(tmp_path, monkeypatch, capsys, images):
    """The child probes the model as ``python -m fasthvae.train --amp`` would (its stages timed, the
    loaders fed the training images of ``--data``) and reports the record on one line."""
    monkeypatch.setattr(speed, "TIMING_SECONDS", {"step": 0.5, "loader": 0.5})
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # no compiler run here
    bench_probe.main(["--child", "--model", "vae", "--batch-size", "4", "--data", images])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(bench_probe.RESULT))
    record = json.loads(line.removeprefix(bench_probe.RESULT))
    assert list(record["stage_s"]) == ["switches", "loader"] and record["device"] == "cpu"
    assert len(record["candidates"]) == 8 + 2 and record["choice"]["loader"] in ("torch", "resident")


def test_bench_probe_cold_gives_each_process_an_empty_inductor_cache_and_headers(monkeypatch):
    """``--cold``: Inductor's cache and its temporary folder (where it keeps its precompiled headers,
    apart from the cache) are one empty folder per process; without it the environment is as given."""
    envs = []
    monkeypatch.setattr(bench_probe, "child_result", lambda command, env, *rest: envs.append(env) or {})
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/given")
    for cold in (True, True, False):
        args = argparse.Namespace(model="vae", preset="small", batch_size=4, data=None, cold=cold)
        bench_probe.run_child(args)
    (first, second, warm) = envs
    assert first["TORCHINDUCTOR_CACHE_DIR"] == first["TMPDIR"] != "/given"
    assert second["TMPDIR"] != first["TMPDIR"]
    assert warm["TORCHINDUCTOR_CACHE_DIR"] == "/given" and warm.get("TMPDIR") == os.environ.get("TMPDIR")


def test_bench_probe_says_when_its_probing_process_failed(tmp_path):
    missing = tmp_path / "missing.npz"
    done = run_bench(
        "bench_probe.py", "--model", "vae", "--data", str(missing), "--out", str(tmp_path), fails=True
    )
    assert "bench_probe: the probing process failed" in done.stderr and str(missing) in done.stderr
