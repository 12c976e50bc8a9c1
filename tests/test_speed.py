"""``--speed auto``: the candidates, the decision rule, the cache, and a run that probed."""

import json
import multiprocessing
from dataclasses import replace

import numpy as np
import pytest
import torch

from fasthvae import hardware, train
from fasthvae.training import speed
from fasthvae.training.config import TrainConfig, with_model_defaults
from fasthvae.training.distributed import DistInfo
from fasthvae.training.runtime import resolve_runtime
from tests.helpers import SMALL, compile_with_backend, make_compilation_fail, needs_onednn, read_metrics

DEFAULTS = {"compile": True, "channels_last": True, "fused_optimizer": True}
IMAGES = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)


def measured(*windows: list[float]) -> list[speed.Candidate]:
    """Candidates with these windows, the first the defaults, the others flipping one switch each."""
    flips = [{}, {"channels_last": False}, {"compile": False}, {"fused_optimizer": False}]
    return [
        speed.Candidate(DEFAULTS | flip, windows=list(w)) for flip, w in zip(flips, windows, strict=False)
    ]


def config(tmp_path, **changes) -> TrainConfig:
    return TrainConfig(
        **{"model": "vae", "channels": 8, "latent": 16, "batch_size": 8, "out": str(tmp_path)} | changes
    )


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv(speed.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "fasthvae" / "speed"


def test_a_candidate_replaces_the_defaults_only_when_faster_in_every_round():
    defaults = [1.0, 1.0, 1.0, 1.0]
    assert speed.decide(measured(defaults, [0.8, 0.8, 0.8, 1.01])) == DEFAULTS  # slower in one round
    assert speed.decide(measured(defaults, [0.99, 0.99, 0.98, 0.99])) == DEFAULTS  # under MIN_GAIN
    assert speed.decide(measured(defaults, [0.9, 0.9, 0.9, 0.9])) == DEFAULTS | {"channels_last": False}
    assert speed.decide(measured(defaults, [0.8, 0.8])) == DEFAULTS  # not timed in every round


def test_a_candidate_slower_than_the_defaults_in_a_round_is_timed_no_more(monkeypatch):
    """Steps on a fake clock, one step a window: a candidate that loses a round is not timed again,
    the one faster in every round is timed in all of them; when only the defaults are left, the
    rounds end."""
    now = [0.0]
    monkeypatch.setattr(speed, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: now[0])}))
    monkeypatch.setattr(speed, "TIMING_SECONDS", {"step": 64.0})  # 4 s a window: one step each

    def step(*costs: float):
        calls = iter(range(100))
        return lambda: now.__setitem__(0, now[0] + costs[min(next(calls), len(costs) - 1)])

    # Seconds per call (whole, so that the clock adds exactly): the warm-up step, then one a round.
    steps = [step(4), step(3), step(4, 5), step(3, 3, 5)]
    candidates = measured([], [], [], [])
    speed.time_rounds(steps, candidates, torch.device("cpu"))
    assert [c.windows for c in candidates] == [[4] * 4, [3] * 4, [5], [3, 5]]
    assert speed.decide(candidates) == DEFAULTS | {"channels_last": False}

    steps, candidates = [step(4), step(5), step(4)], measured([], [], [])
    speed.time_rounds(steps, candidates, torch.device("cpu"))
    assert [c.windows for c in candidates] == [[4], [5], [4]], "a tie is not faster"
    assert speed.decide(candidates) == DEFAULTS


def test_the_decision_pairs_rounds_so_that_the_machines_drift_cancels():
    # Round 4 runs 20% faster for everyone: the ranges overlap, the per-round ratios do not.
    drift = [1.0, 1.0, 1.0, 0.8]
    challenger = [0.9 * d for d in drift]
    assert speed.decide(measured(drift, challenger)) == DEFAULTS | {"channels_last": False}
    # Of two candidates faster in every round, the one with the lower median ratio.
    chosen = speed.decide(measured([1.0] * 4, [0.9] * 4, [0.7, 0.7, 0.95, 0.95], [0.8] * 4))
    assert chosen == DEFAULTS | {"fused_optimizer": False}


def test_candidates_vary_only_the_switches_left_unset(tmp_path):
    rt = resolve_runtime(config(tmp_path), DistInfo())
    every = speed.candidates(config(tmp_path), rt)
    assert every[0] == {name: getattr(rt, name) for name in speed.SWITCHES} and len(every) == 8
    assert len({tuple(c.values()) for c in every}) == 8
    given = config(tmp_path, compile=False, channels_last=False)
    rt = resolve_runtime(given, DistInfo())
    assert speed.candidates(given, rt) == [
        {"compile": False, "channels_last": False, "fused_optimizer": True},
        {"compile": False, "channels_last": False, "fused_optimizer": False},
    ]


@pytest.mark.parametrize(
    "changes, steps, source",
    [
        ({"speed": "fixed"}, 10**6, "fixed defaults"),
        ({"compile": True, "channels_last": False, "fused_optimizer": True}, 10**6, "every switch given"),
        ({}, speed.PROBE_MIN_STEPS - 1, "defaults: a run of 1999 steps is shorter than a probe pays for"),
    ],
)
def test_no_probe_where_it_cannot_pay(tmp_path, cache, monkeypatch, changes, steps, source):
    monkeypatch.setattr(speed, "measure", lambda *a: pytest.fail("probed"))
    c = config(tmp_path, **changes)
    rt = resolve_runtime(c, DistInfo())
    chosen, record = speed.choose_speed(c, rt, DistInfo(), steps, IMAGES if "speed" in changes else None)
    assert chosen == rt and record["source"] == source and not cache.exists()


def fake_measure(choice: dict):
    """A ``measure`` whose ``choice`` candidate is 20% faster in every round; counts its calls and
    draws random numbers, as building the candidates' models does."""

    def measure(config, rt, switch_sets):
        measure.calls += 1
        torch.rand(1)
        return [
            speed.Candidate(s, first_step_s=0.1, windows=[0.08 if s == choice else 0.1] * speed.ROUNDS)
            for s in switch_sets
        ]

    measure.calls = 0
    return measure


def fake_measure_loaders(config, rt, images, names, step):
    """The DataLoader 20% faster in every round."""
    return [
        speed.Candidate({"loader": n}, windows=[0.08 if n == "torch" else 0.1] * speed.ROUNDS) for n in names
    ]


def test_a_probe_is_cached_per_machine_model_and_batch(tmp_path, cache, monkeypatch, capsys):
    choice = DEFAULTS | {"channels_last": False, "fused_optimizer": False}
    fake = fake_measure(choice)
    monkeypatch.setattr(speed, "measure", fake)
    monkeypatch.setattr(speed, "measure_loaders", fake_measure_loaders)
    c = config(tmp_path)
    rt = resolve_runtime(c, DistInfo())
    assert rt.loader == "resident", "the default loader"
    chosen, record = speed.choose_speed(c, rt, DistInfo(), 10**6, IMAGES)
    assert (chosen.channels_last, chosen.fused_optimizer, chosen.compile) == (False, False, True)
    assert chosen.loader == "torch" and record["choice"] == choice | {"loader": "torch"}
    assert record["source"] == "probe" and len(record["candidates"]) == 8 + 2 and fake.calls == 1
    line = "speed auto: compile on, channels_last off, fused_optimizer off, loader torch (probe of 10"
    assert line in capsys.readouterr().err
    again, record = speed.choose_speed(c, rt, DistInfo(), 10**6, IMAGES)
    assert again == chosen and record["source"] == "cache" and fake.calls == 1
    # Another batch size is another key; a damaged file is probed again and rewritten.
    speed.choose_speed(config(tmp_path, batch_size=16), rt, DistInfo(), 10**6, IMAGES)
    assert fake.calls == 2 and len(list(cache.glob("*.json"))) == 2
    path = speed.cache_path(speed.cache_key(c, rt, 1))
    path.write_text("{not json")
    speed.choose_speed(c, rt, DistInfo(), 10**6, IMAGES)
    assert fake.calls == 3 and json.loads(path.read_text())["record"]["choice"] == choice | {
        "loader": "torch"
    }
    # Image files on disk have one loader (DALI): nothing to choose there.
    assert (
        speed.loader_candidates(c, rt, object())
        == []
        == speed.loader_candidates(config(tmp_path, loader="torch"), rt, IMAGES)
    )


def test_the_cache_key_follows_isa_caps_and_the_code(tmp_path, monkeypatch):
    c = config(tmp_path)
    rt = resolve_runtime(c, DistInfo())
    for name in hardware.ISA_CAP_ENVS:
        monkeypatch.delenv(name, raising=False)
    plain = speed.cache_key(c, rt, 1)
    assert plain["code"] == speed.code_digest() and len(plain["code"]) == 16
    digested = {p.name for p in speed.digested_files()}
    assert {"speed.py", "deep.py", "gelu_cpu.cpp", "onednn_conv.cpp"} <= digested  # a rebuilt kernel too
    caps = [("ONEDNN_MAX_CPU_ISA", "AVX2"), ("FASTHVAE_CPU_ISA", "avx2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2")]
    for name, value in caps:
        monkeypatch.setenv(name, value)
        assert speed.cache_path(speed.cache_key(c, rt, 1)) != speed.cache_path(plain)
        monkeypatch.delenv(name)
    assert speed.cache_path(speed.cache_key(c, rt, 1)) == speed.cache_path(plain)
    other_wrapper = "python" if rt.compile_wrapper == "cpp" else "cpp"
    assert speed.cache_path(
        speed.cache_key(c, replace(rt, compile_wrapper=other_wrapper), 1)
    ) != speed.cache_path(plain)


def test_a_real_probe_times_every_candidate_and_keeps_the_random_state(tmp_path, monkeypatch):
    """The probe times every candidate, leaves the random state as it found it, and builds each
    candidate's step with the run's Inductor wrapper (so that the run's compile comes from the
    probe's caches)."""
    monkeypatch.setattr(speed, "TIMING_SECONDS", {"step": 0.5, "loader": 0.5})
    c = config(tmp_path, compile=False, workers=1, compile_wrapper="cpp")  # eager: no compilation here
    c = with_model_defaults(c)
    rt = resolve_runtime(c, DistInfo())
    builds, real_build = [], speed.build_state
    monkeypatch.setattr(
        speed,
        "build_state",
        lambda c, rt, *args: builds.append(rt.compile_wrapper) or real_build(c, rt, *args),
    )
    torch.manual_seed(3)
    before = torch.get_rng_state()
    record = speed.probe(c, rt, IMAGES)
    assert torch.equal(torch.get_rng_state(), before)
    assert builds == ["cpp"] * 4, "one model per candidate; the loaders feed the chosen one's step"
    assert [r["loader"] for r in record["candidates"][4:]] == ["resident", "torch"]
    assert not any("loader" in r for r in record["candidates"][:4]), "each candidate records its own"
    assert [(r["channels_last"], r["fused_optimizer"]) for r in record["candidates"][:4]] == [
        (True, True),
        (True, False),
        (False, True),
        (False, False),
    ]
    assert all(1 <= len(r["step_ms"]) <= speed.ROUNDS and min(r["step_ms"]) > 0 for r in record["candidates"])
    assert list(record["stage_s"]) == ["switches", "loader"]
    said = speed.describe(record | {"source": "probe", "cache": "x"})
    assert f"{record['probe_s']} s: switches {record['stage_s']['switches']} s, loader" in said
    assert 0 < sum(record["stage_s"].values()) <= record["probe_s"] + 0.1
    assert {k: record["choice"][k] for k in speed.SWITCHES} in [
        {k: r[k] for k in speed.SWITCHES} for r in record["candidates"][:4]
    ]
    assert record["choice"]["loader"] in ("torch", "resident")


def test_compiled_candidates_that_differ_only_in_the_optimizer_share_one_compilation(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "TIMING_SECONDS", {"step": 0.5, "loader": 0.5})
    compiled = []  # torch.compile counted, its module returned as it is (no compiler run here)
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.append(module) or module)
    c = with_model_defaults(config(tmp_path, compile=True, loader="resident"))
    rt = resolve_runtime(c, DistInfo())
    models, real_build = [], speed.build_state
    monkeypatch.setattr(
        speed, "build_state", lambda c, rt, model=None: models.append(model) or real_build(c, rt, model)
    )
    before = torch.get_rng_state()
    record = speed.probe(c, rt, IMAGES)
    assert torch.equal(torch.get_rng_state(), before), "the shared steps leave the random state as found"
    assert [(r["channels_last"], r["fused_optimizer"]) for r in record["candidates"]] == [
        (True, True),
        (True, False),
        (False, True),
        (False, False),
    ]
    assert len(compiled) == 2, "one compilation per memory format"
    assert [m is None for m in models] == [True, False, True, False], (
        "the second of a pair trains the first's model"
    )
    assert all(r["step_ms"] for r in record["candidates"]), "each timed with its optimizer"


def test_a_pair_whose_first_fails_to_compile_compiles_its_second_alone(tmp_path, monkeypatch):
    """The defaults' compilation fails: their partner (the same switches, the other optimizer) gets
    no shared model or objective from them, compiles its own, and is timed and chosen."""
    monkeypatch.setattr(speed, "TIMING_SECONDS", {"step": 0.5, "loader": 0.5})
    graphs = []

    def first_graph_fails(gm, example_inputs):
        graphs.append(gm)
        if len(graphs) == 1:
            raise RuntimeError("the compiler broke")
        return gm.forward

    compile_with_backend(monkeypatch, first_graph_fails)
    c = with_model_defaults(config(tmp_path, compile=True, channels_last=True, loader="resident"))
    rt = resolve_runtime(c, DistInfo())
    models, real_build = [], speed.build_state
    monkeypatch.setattr(
        speed, "build_state", lambda c, rt, model=None: models.append(model) or real_build(c, rt, model)
    )
    record = speed.probe(c, rt, IMAGES)
    torch._dynamo.reset()
    failed, alone = record["candidates"]
    assert failed["fused_optimizer"] and "the compiler broke" in failed["failed"]
    assert not alone["fused_optimizer"] and alone["step_ms"] and len(graphs) > 1
    assert models == [None, None], "the second builds its own model"
    assert record["choice"]["fused_optimizer"] is False


def test_a_candidate_that_fails_is_left_out_and_never_chosen(tmp_path, monkeypatch, capsys):
    """The defaults compile, and their compilation fails: the probe says so, times the rest and
    chooses among them; the record keeps the failure."""
    monkeypatch.setattr(speed, "TIMING_SECONDS", {"step": 0.5, "loader": 0.5})
    make_compilation_fail(monkeypatch)
    c = with_model_defaults(config(tmp_path, channels_last=False, fused_optimizer=False, loader="resident"))
    rt = resolve_runtime(c, DistInfo())
    assert rt.compile
    record = speed.probe(c, rt, IMAGES)
    torch._dynamo.reset()
    failed, eager = record["candidates"]
    assert failed["compile"] and "the compiler broke" in failed["failed"] and "step_ms" not in failed
    assert not eager["compile"] and len(eager["step_ms"]) == 1, "nothing left to compare it with"
    assert record["choice"]["compile"] is False
    assert "failed, left out (BackendCompilerFailed" in capsys.readouterr().err
    assert "probe of 2 candidates" in speed.describe(record | {"source": "probe", "cache": "x"})


@needs_onednn
def test_the_probe_times_the_onednn_convolutions_on_and_off_with_the_chosen_switches(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "TIMING_SECONDS", {"step": 0.5, "staged": 0.5, "loader": 0.5})
    deep = {"model": "deep", "layout": "1x1,8x1,32d1", "width": 16, "zdim": 2, "batch_size": 4}
    c = with_model_defaults(config(tmp_path, compile=False, fused_optimizer=True, loader="resident", **deep))
    rt = resolve_runtime(c, DistInfo())
    assert rt.onednn_conv, "on by default where it can run"
    builds, real_build = [], speed.build_state
    monkeypatch.setattr(speed, "build_state", lambda *args: builds.append(1) or real_build(*args))
    record = speed.probe(c, rt, IMAGES)
    assert len(builds) == 3, "two channels_last candidates, then the chosen one's step reused and one more"
    staged = record["candidates"][2:]
    first = {k: record["candidates"][0][k] for k in speed.SWITCHES}
    chosen = {k: record["choice"][k] for k in speed.SWITCHES}
    assert [r["onednn_conv"] for r in staged] == [True, False]
    assert "first_step_s" not in staged[0] and staged[1]["first_step_s"] > 0, "the chosen step reused"
    assert list(record["stage_s"]) == ["switches", "onednn_conv"]
    assert all({k: r[k] for k in speed.SWITCHES} == chosen for r in staged)
    assert chosen in (first, {k: record["candidates"][1][k] for k in speed.SWITCHES})
    assert record["choice"]["onednn_conv"] in (True, False) and len(record["candidates"]) == 4
    assert speed.staged_free(c, rt) == ["onednn_conv"]
    assert speed.staged_free(with_model_defaults(config(tmp_path, onednn_conv=False, **deep)), rt) == []


def test_the_dataloaders_workers_run_only_in_its_own_windows(tmp_path, monkeypatch):
    """Each loader's window draws from its own iteration: the DataLoader's workers are alive while
    it feeds the step and gone while the resident loader does (and after the probe); each window
    starts after as many untimed steps as its loader keeps batches in flight (none for the
    resident loader)."""
    monkeypatch.setattr(speed, "TIMING_SECONDS", {"step": 0.5, "loader": 0.5})
    c = with_model_defaults(config(tmp_path, compile=False, workers=1))
    rt = resolve_runtime(c, DistInfo())
    draws, real_next, lead_ins, real_rounds = [], speed.Feed.next, [], speed.time_rounds

    def next_batch(feed):
        batch = real_next(feed)
        draws.append((type(feed.loader).__name__, len(multiprocessing.active_children())))
        return batch

    def rounds(*args, **kwargs):
        lead_ins.append(args[-1])
        return real_rounds(*args, **kwargs)

    monkeypatch.setattr(speed.Feed, "next", next_batch)
    monkeypatch.setattr(speed, "time_rounds", rounds)
    speed.measure_loaders(c, rt, IMAGES, ["torch", "resident"])
    assert {children for name, children in draws if name == "ResidentLoader"} == {0}
    assert {children for name, children in draws if name == "TorchLoader"} == {1}
    assert lead_ins == [[2, 0]] and not multiprocessing.active_children()


def test_a_run_that_probed_trains_as_a_fixed_run_given_its_choice(data, tmp_path, cache, monkeypatch):
    choice = {"compile": False, "channels_last": False, "fused_optimizer": False}
    monkeypatch.setattr(speed, "PROBE_MIN_STEPS", 1)
    monkeypatch.setattr(speed, "measure", fake_measure(choice))
    common = ["--data", data, "--epochs", "1", "--limit-train", "64", "--no-compile", *SMALL]
    assert train.main([*common, "--out", str(tmp_path / "auto")]) == 0
    fixed = ["--speed", "fixed", "--no-channels-last", "--no-fused-optimizer"]
    assert train.main([*common, "--out", str(tmp_path / "fixed"), *fixed]) == 0
    auto = json.loads((tmp_path / "auto" / "config.json").read_text())["runtime"]
    assert auto["speed"]["source"] == "probe" and auto["speed"]["choice"] == choice
    assert (auto["compile"], auto["channels_last"], auto["fused_optimizer"]) == (False, False, False)
    columns = ("loss", "recon", "kl_z1", "kl_z2")
    rows = [[{k: r[k] for k in columns} for r in read_metrics(tmp_path / name)] for name in ("auto", "fixed")]
    assert rows[0] == rows[1]
