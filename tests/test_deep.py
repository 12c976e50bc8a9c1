"""The deep top-down HVAE: presets and layouts, its KLs and bounds, EMA, update skipping, latent
health, resume and compile (CPU, tiny configs)."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fasthvae import train
from fasthvae.eval.metrics import evaluate_model, iw_bound
from fasthvae.eval.runs import load_run
from fasthvae.models import PRESETS, DeepHVAE, build_model, build_model_from_config, deep
from fasthvae.ops import reference
from fasthvae.training.checkpoint import load_checkpoint
from fasthvae.training.config import TrainConfig
from fasthvae.training.grad_skip import AdaptiveSkip
from fasthvae.training.latent_health import HealthMonitor
from fasthvae.training.state import adaptive_skip
from tests.helpers import (
    DEEP_TINY,
    KILL_AFTER_FIRST_CHECKPOINT,
    assert_same_state,
    read_metrics,
    run_process,
    scale_loss_by_step,
    torchrun,
)

TINY = deep.DeepSpec("1x1,4x1,8x1,16x1,32x1", width=8, zdim=2, encoder_blocks=1)
TINY_ARGS = [*DEEP_TINY, "--batch-size", "32", "--limit-test", "64", "--loader", "resident", "--no-compile"]


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 255


def tiny(likelihood: str = "mixture", seed: int = 0) -> DeepHVAE:
    torch.manual_seed(seed)
    return DeepHVAE(TINY, likelihood=likelihood)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("likelihood", ["mixture", "bernoulli"])
def test_every_preset_layout_gives_shapes_and_samples(preset, likelihood):
    spec = replace(PRESETS[preset], width=8, zdim=2, encoder_blocks=1)  # the preset's layout, tiny widths
    model = DeepHVAE(spec, likelihood=likelihood)
    x = images(2)
    out = model(x)
    assert out.decoded.shape == (2, 100 if likelihood == "mixture" else 3, 32, 32)
    resolutions = deep.parse_layout(spec.layout)
    assert len(out.kls) == len(resolutions) and all(kl.shape == (2,) for kl in out.kls.values())
    assert model.num_levels == len(set(resolutions))
    for temperature in (0.0, 0.7, 1.0):
        samples = model.sample(3, temperature)
        assert samples.shape == (3, 3, 32, 32) and samples.min() >= 0 and samples.max() <= 1


def test_layout_cells_without_a_latent_run_in_order_and_add_no_kl():
    assert deep.parse_blocks("1x2,8d1,32x1") == [(1, True), (1, True), (8, False), (32, True)]
    assert deep.parse_layout("1x2,8d1,32x1") == [1, 1, 32]
    model = DeepHVAE(replace(TINY, layout="1x2,8d1,32x1"))
    assert [(r, type(b).__name__) for r, b in model.top_down] == [
        (1, "LatentGroup"),
        (1, "LatentGroup"),
        (8, "Cell"),
        (32, "LatentGroup"),
    ]
    assert list(model(images(2)).kls) == ["kl_00_1x1", "kl_01_1x1", "kl_02_32x32"]
    assert model.num_levels == 2, "the staggered schedule's levels count latent resolutions only"


def test_layout_errors_are_clear():
    for bad, message in [
        ("1x1,4y2", "not RxN"),
        ("1x1,3x2,32x1", "must be one of"),
        ("4x1,1x1,32x1", "must rise"),
        ("1x1,4x2", "last resolution must be 32"),
        ("1x1,32x0", "has no block"),
        ("1x1d1,32d1", "not RxN"),
        ("1d1,32d1", "no latent group"),
    ]:
        with pytest.raises(ValueError, match=message):
            deep.parse_layout(bad)
    with pytest.raises(ValueError, match="unknown deep preset"):
        build_model_from_config({"model": "deep", "preset": "huge", "likelihood": "mixture"})
    with pytest.raises(ValueError, match="posterior must be one of absolute, residual"):
        replace(TINY, posterior="relative")


def test_a_config_names_the_posterior_and_one_without_it_keeps_the_absolute():
    base = {"model": "deep", "preset": "small", "likelihood": "mixture"}
    assert build_model_from_config(base).spec.posterior == "absolute"
    assert build_model_from_config(base | {"posterior": "residual"}).spec.posterior == "residual"


def test_preset_sizes():
    """small is sized for a 2-core CPU, base for a GPU (parameters in millions, see README)."""
    assert sum(p.numel() for p in DeepHVAE("small").parameters()) / 1e6 == pytest.approx(0.32, abs=0.01)
    groups = {name: len(deep.parse_layout(spec.layout)) for name, spec in PRESETS.items()}
    assert groups["base"] > 3 * groups["small"]


def test_group_kls_sum_to_the_kl_of_all_latents(monkeypatch):
    """Each group's fused KL against the plain-PyTorch KL of every latent at once."""
    model = tiny()
    params = []
    real = deep.ops.sample_and_kl

    def recording(mu, logvar, mu_p, logvar_p, **kwargs):
        params.append([t.detach().flatten(1) for t in (mu, logvar, mu_p, logvar_p)])
        return real(mu, logvar, mu_p, logvar_p, **kwargs)

    monkeypatch.setattr(deep.ops, "sample_and_kl", recording)
    out = model(images(4))
    everything = [torch.cat(parts, 1) for parts in zip(*params, strict=True)]
    total = reference.gaussian_kl(*everything, "sample")
    assert torch.allclose(sum(out.kls.values()), total, rtol=1e-5)


def residual_tiny(seed: int = 0) -> DeepHVAE:
    torch.manual_seed(seed)
    return DeepHVAE(replace(TINY, posterior="residual"))


def test_the_residual_posterior_is_the_prior_plus_offsets_and_its_kl_depends_on_them_only(monkeypatch):
    """Each group's q is N(mu_p + dmu, e^(logvar_p + dlogvar)) from its cell's outputs, its KL is
    0.5 (dmu^2 / sigma_p^2 + e^dlogvar - 1 - dlogvar), and that KL has no gradient in the prior's
    mean (float64, weights perturbed off their initial zeros, the prior and posterior cells apart)."""
    model = residual_tiny().double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    model.heads_as_one = False
    outputs, passed = [], []
    real_outputs, real_sample = deep.LatentGroup.posterior_outputs, deep.ops.sample_and_kl

    def recording_outputs(self, h, activation):
        outputs.append(real_outputs(self, h, activation))
        return outputs[-1]

    def recording_sample(mu, logvar, mu_p, logvar_p, **kwargs):
        passed.append((mu, logvar, mu_p, logvar_p))
        return real_sample(mu, logvar, mu_p, logvar_p, **kwargs)

    monkeypatch.setattr(deep.LatentGroup, "posterior_outputs", recording_outputs)
    monkeypatch.setattr(deep.ops, "sample_and_kl", recording_sample)
    out = model(images(3).double())
    assert len(passed) == len(model.groups)
    for (dmu, dlogvar), (mu, logvar, mu_p, logvar_p), kl in zip(
        outputs, passed, out.kls.values(), strict=True
    ):
        assert torch.equal(mu, mu_p + dmu)
        assert torch.equal(logvar, deep.soft_clamp(logvar_p + dlogvar))
        offset = logvar - logvar_p  # dlogvar after the clamp
        closed = 0.5 * ((mu - mu_p) ** 2 / logvar_p.exp() + offset.exp() - 1 - offset).flatten(1).sum(1)
        torch.testing.assert_close(kl, closed, rtol=1e-10, atol=1e-10)
        grad_mu_p = torch.autograd.grad(kl.sum(), mu_p, retain_graph=True)[0]
        assert grad_mu_p.abs().max() < 1e-9 * (1 + kl.sum().item())


def test_the_residual_posterior_starts_as_the_absolute_one():
    """The priors start at N(0, I) (their last conv is zero), so with the same weights and noise the
    residual model's loss terms equal the absolute one's bit for bit at initialisation."""
    absolute, residual = tiny(), residual_tiny()
    residual.load_state_dict(absolute.state_dict())
    x = images(4)
    terms = []
    for model in (absolute, residual):
        torch.manual_seed(3)
        terms.append(model.loss(x, [1.0] * model.num_levels))
    for name, value in terms[0].items():
        assert torch.equal(value, terms[1][name]), name


def test_the_residual_posterior_with_kl_balancing_trains_under_ddp(data, tmp_path):
    """Two gloo ranks train the deep model with the residual posterior and KL balancing through
    the warm-up epoch (balancing on) and the next (off): every parameter takes part in each step's
    gradient (DDP fails on one that does not), and both epochs end finite. (128 images, 2 ranks,
    batch 16: 4 steps per rank per epoch.)"""
    out = tmp_path / "ddp"
    args = [*TINY_ARGS, "--batch-size", "16", "--posterior", "residual", "--kl-warmup", "1", "--kl-balance"]
    args += ["--data", data, "--out", str(out), "--epochs", "2", "--limit-train", "128", "--no-tensorboard"]
    proc = torchrun("-m", "fasthvae.train", *args, "--speed", "fixed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert all(math.isfinite(float(row["loss"])) and row["skipped_steps"] == "0" for row in rows)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 8 and len(state["rng"]) == 2


def test_free_bits_floor_each_kl_term_of_the_loss_and_stop_its_gradient_below_the_floor():
    """Each KL enters the loss as max(its batch mean, free_bits x its group's latent dimensions):
    a floor above every group leaves the reconstruction's gradient alone; the terms stay plain."""
    model, x, weights = tiny(), images(8), torch.tensor([1.0, 0.5, 1.0, 1.0, 1.0])
    assert model.kl_dims == {n: 2 * r * r for n, r in zip(model.group_names, (1, 4, 8, 16, 32), strict=True)}

    def loss_and_grads(free_bits: float, key: str = "loss") -> tuple[dict, list[torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(1)  # the same posterior samples in every call
        terms = model.loss(x, weights, free_bits)
        terms[key].backward()
        return terms, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, _ = loss_and_grads(0.0)
    floor = 0.05
    floored, _ = loss_and_grads(floor)
    expected = floored["recon"] + sum(
        weights[model.kl_levels[n]] * max(floored[n], floor * model.kl_dims[n]) for n in model.group_names
    )
    assert torch.allclose(floored["loss"], expected, rtol=1e-6)
    assert all(torch.equal(plain[n], floored[n]) for n in ["recon", *model.group_names]), "terms stay plain"
    assert any(floored[n] < floor * model.kl_dims[n] for n in model.group_names), "some group is floored"
    assert floored["loss"] > plain["loss"]
    _, above_all = loss_and_grads(1e6)
    _, recon_only = loss_and_grads(0.0, key="recon")
    assert all(torch.equal(a, b) for a, b in zip(above_all, recon_only, strict=True))


def test_kl_balancing_scales_each_term_by_its_kl_per_dimension_over_the_groups_mean():
    """balance 1: each KL term weighed by c = (KL + 0.01) / dims over the mean of that across the
    groups, c taking no gradient; balance 0: the plain loss; in between, 1 + balance * (c - 1)."""
    model, x, weights = tiny(), images(8), torch.tensor([1.0, 0.5, 1.0, 1.0, 1.0])

    def loss_and_grads(balance: float | None, manual: dict[str, float] | None = None):
        model.zero_grad()
        torch.manual_seed(1)  # the same posterior samples in every call
        terms = model.loss(x, weights, balance=None if balance is None else torch.tensor(balance))
        if manual is not None:  # the loss rebuilt from the terms with constant coefficients
            terms["loss"] = terms["recon"] + sum(
                weights[model.kl_levels[n]] * manual[n] * terms[n] for n in model.group_names
            )
        terms["loss"].backward()
        return terms, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, plain_grads = loss_and_grads(None)
    per_dim = {n: (plain[n].item() + 0.01) / model.kl_dims[n] for n in model.group_names}
    mean = sum(per_dim.values()) / len(per_dim)
    c = {n: v / mean for n, v in per_dim.items()}
    assert max(c.values()) / min(c.values()) > 2, "the groups differ: the test can tell"
    for balance in (0.0, 0.4, 1.0):
        scale = {n: 1 + balance * (c[n] - 1) for n in model.group_names}
        balanced, grads = loss_and_grads(balance)
        _, expected_grads = loss_and_grads(None, manual=scale)
        expected = balanced["recon"] + sum(
            weights[model.kl_levels[n]] * scale[n] * balanced[n] for n in model.group_names
        )
        assert torch.allclose(balanced["loss"], expected, rtol=1e-5)
        assert all(torch.equal(plain[n], balanced[n]) for n in ["recon", *model.group_names]), (
            "terms stay plain"
        )
        assert all(
            torch.allclose(g, e, rtol=1e-4, atol=1e-6) for g, e in zip(grads, expected_grads, strict=True)
        )
    assert all(
        torch.allclose(g, e, rtol=1e-4, atol=1e-6)
        for g, e in zip(loss_and_grads(0.0)[1], plain_grads, strict=True)
    )
    coefficients = model.kl_balance_coefficients({n: plain[n] for n in model.group_names})
    assert sum(coefficients.values()).item() == pytest.approx(len(model.group_names), rel=1e-6)


def test_kl_balancing_composes_with_free_bits():
    """Each floored term is scaled by its coefficient, computed from the plain KLs."""
    model, x, weights = tiny(), images(8), torch.ones(5)
    torch.manual_seed(1)
    terms = model.loss(x, weights, free_bits=0.05, balance=torch.tensor(1.0))
    c = model.kl_balance_coefficients({n: terms[n] for n in model.group_names})
    expected = terms["recon"] + sum(c[n] * max(terms[n], 0.05 * model.kl_dims[n]) for n in model.group_names)
    assert torch.allclose(terms["loss"], expected, rtol=1e-5)


def test_a_compiled_loss_takes_each_steps_balance_without_recompiling():
    from torch._dynamo.testing import CompileCounter

    model, x, weights = tiny(), images(4), torch.ones(5)
    counter = CompileCounter()
    compiled = torch.compile(model.loss, backend=counter, dynamic=False)
    for balance in (1.0, 0.5, 0.0):
        torch.manual_seed(1)
        terms = compiled(x, weights, 0.0, torch.tensor(balance))
        torch.manual_seed(1)
        assert torch.allclose(
            terms["loss"], model.loss(x, weights, 0.0, torch.tensor(balance))["loss"], rtol=1e-5
        )
    assert counter.frame_count == 1


def test_every_model_counts_the_latent_dimensions_of_its_kls():
    assert build_model("vae", latent=64).kl_dims == {"kl_z": 64}
    assert build_model("hvae", latent=32, z1_channels=4).kl_dims == {"kl_z1": 4 * 8 * 8, "kl_z2": 32}
    small = DeepHVAE(replace(PRESETS["small"], layout="1x2,4x4,8x4,16x4,32x1", zdim=16))
    assert sum(small.kl_dims.values()) == 37_920  # the deep rows' latent dimensions (latent health)


def test_soft_clamped_log_variances_stay_finite_in_low_precision():
    x = torch.linspace(-1e4, 1e4, 101)
    clamped = deep.soft_clamp(x)
    assert clamped.abs().max() <= deep.LOGVAR_BOUND
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.isfinite(torch.exp(0.5 * deep.soft_clamp(x.to(dtype)))).all()
        assert torch.isfinite(torch.exp(-deep.soft_clamp(x.to(dtype)))).all()
    assert deep.soft_clamp(torch.tensor(0.5)).item() == pytest.approx(0.5, abs=1e-3)


def test_neg_elbo_matches_a_monte_carlo_elbo_and_iw_bounds_tighten():
    """Analytic KLs with z_<i from q (the reported -ELBO) against many importance weights."""
    model = tiny().eval()
    x = images(4).repeat(128, 1, 1, 1)  # 4 images x 128
    torch.manual_seed(1)
    with torch.no_grad():
        log_w = model.log_weight(x).double().view(128, 4)
        reported = evaluate_model(model, [x])["neg_elbo"]
    se = log_w.std(0).mean().item() * math.sqrt(1 / 512 + 1 / 512)
    assert abs(reported + log_w.mean().item()) < 4 * se
    torch.manual_seed(2)
    k1 = iw_bound(model, x[:8], 1).mean().item()
    k32 = iw_bound(model, x[:8], 32).mean().item()
    assert k32 < k1
    assert k32 <= reported


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(data):
    model = tiny()
    with np.load(data) as f:
        x = torch.from_numpy(f["x_train"][:16]).permute(0, 3, 1, 2).float() / 255
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = model.loss(x, [1.0] * model.num_levels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_compiles_whole_with_fullgraph():
    torch.manual_seed(0)
    model = DeepHVAE(replace(TINY, layout="4x1,16d1,32x1"))  # every kind of step, a small graph
    x = images(4)
    weights = torch.ones(model.num_levels)
    compiled = torch.compile(model.loss, fullgraph=True)
    torch.manual_seed(5)
    eager = model.loss(x, weights)
    torch.manual_seed(5)
    ours = compiled(x, weights)
    ours["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    # The same noise: equal on torch 2.11 and 2.14.1; two groups sharing one seed were 1.9e-4 apart.
    assert ours["loss"].item() == pytest.approx(eager["loss"].item(), rel=1e-5)


def test_adaptive_skip_skips_a_spike_not_a_normal_step():
    skip = AdaptiveSkip(factor=10, window=100, warmup=20)
    rng = np.random.default_rng(0)
    for norm in rng.lognormal(0, 0.3, 50):
        assert skip.allows(float(norm))
    assert not skip.allows(1e6), "an injected huge gradient is skipped"
    assert skip.allows(1.5), "a normal one is not"
    assert not skip.allows(math.nan) and not skip.allows(math.inf)
    assert skip.skipped == 3


def test_the_trainers_adaptive_skip_lives_on_the_training_device():
    """Its window meets the step's gradient norm on that device (a CPU window beside a CUDA norm
    is an error): the meta device stands in for a GPU here."""
    config = TrainConfig(model="deep", skip_factor=10.0)
    assert adaptive_skip(config, torch.device("meta")).norms.is_meta
    assert adaptive_skip(replace(config, skip_factor=0.0), torch.device("cpu")) is None


def test_adaptive_skip_never_stalls_a_healthy_run():
    """Norms that drift 100x over a run and noise up to ~3x are never skipped; a lasting change of
    scale (x30, or growing as a KL weight switches on) goes on after `patience` skipped steps."""
    skip = AdaptiveSkip(factor=10, window=100, warmup=20, patience=5)
    rng = np.random.default_rng(1)
    drift = np.exp(np.linspace(0, math.log(100), 5000)) * rng.lognormal(0, 0.35, 5000)
    assert all(skip.allows(float(n)) for n in drift)
    level = drift[-100:].mean() * 30
    verdicts = [skip.allows(float(level)) for _ in range(100)]
    assert verdicts == [False] * 5 + [True] * 95
    assert skip.threshold() > level / 10, "the skipped and taken norms moved the median"
    rising = AdaptiveSkip(factor=10, window=100, warmup=20, patience=5)
    assert all(rising.allows(1.0) for _ in range(50))
    verdicts = [rising.allows(20.0 * 1.15**i) for i in range(40)]  # as the deep run that stalled once
    assert verdicts == [False] * 5 + [True] * 35


def test_adaptive_skip_skips_every_step_of_a_short_burst_and_resumes_its_state():
    skip = AdaptiveSkip(factor=10, window=100, warmup=20, patience=5)
    for _ in range(30):
        assert skip.allows(1.0)
    for burst in (5, 3):
        assert [skip.allows(1e4) for _ in range(burst)] == [False] * burst
        assert skip.allows(1.0), "a normal step ends the burst"
    assert not skip.allows(1e4) and not skip.allows(math.nan), "a non-finite norm neither ends nor extends it"
    again = AdaptiveSkip(factor=10, window=100, warmup=20, patience=5)
    again.load_state_dict(skip.state_dict())
    assert again.threshold() == skip.threshold() and int(again.streak) == int(skip.streak) == 1
    assert [again.allows(1e4) for _ in range(5)] == [False] * 4 + [True]


def test_trainer_skips_an_injected_huge_gradient_only(data, tmp_path, monkeypatch):
    scale_loss_by_step(monkeypatch, lambda n: 1e6 if n == 30 else 1.0)
    argv = ["--data", data, "--out", str(tmp_path), *TINY_ARGS, "--epochs", "4", "--batch-size", "16"]
    assert train.main(argv) == 0  # 16 steps per epoch, 64 in all
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert [r["skipped_steps"] for r in state["history"]] == [0, 1, 0, 0]
    assert state["skip"]["skipped"] == 1


def test_trainer_goes_on_through_a_lasting_jump_of_the_gradient_norm(data, tmp_path, monkeypatch):
    """A KL weight switching on can raise every later gradient norm 1000x: the run skips 5 steps,
    then trains on (clipped) instead of stopping at --max-skips."""
    scale_loss_by_step(monkeypatch, lambda n: 1e3 if n >= 30 else 1.0)
    argv = ["--data", data, "--out", str(tmp_path), *TINY_ARGS, "--epochs", "4", "--batch-size", "16"]
    assert train.main([*argv, "--max-skips", "6"]) == 0  # 16 steps per epoch, 64 in all
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert sum(r["skipped_steps"] for r in state["history"]) == 5 and state["skip"]["skipped"] == 5


def test_evaluation_and_samples_use_the_ema_weights(data, tmp_path, monkeypatch):
    seen = []
    real = train.evaluate_model
    monkeypatch.setattr(
        train, "evaluate_model", lambda model, *a, **k: seen.append(model) or real(model, *a, **k)
    )
    config = train.parse_args(["--data", data, "--out", str(tmp_path), *TINY_ARGS, "--epochs", "1"])
    trainer = train.Trainer(config)
    summary = trainer.run()
    assert trainer.config.ema == 0.999 and seen == [trainer.ema.model] and seen[0] is not trainer.model
    assert summary["evaluated_weights"] == "EMA (rate 0.999)"
    trained = dict(trainer.model.named_parameters())
    averaged = dict(trainer.ema.model.named_parameters())
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained), "the EMA is its own copy"
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert all(torch.equal(state["ema"]["model"][k], v) for k, v in trainer.ema.model.state_dict().items())
    loaded, _, _ = load_run(tmp_path, torch.device("cpu"))  # python -m fasthvae.eval evaluates it too
    assert all(torch.equal(p, averaged[k]) for k, p in loaded.named_parameters())


def test_deep_run_records_latent_health_and_the_test_bound(data, tmp_path):
    argv = ["--data", data, "--out", str(tmp_path), *TINY_ARGS, "--epochs", "2", "--limit-train", "64"]
    argv += ["--test-every-epoch", "32"]
    assert train.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    health = summary["latent_health"]
    assert len(health["groups"]) == 5 and health["latent_dims"] == 2 * (1 + 16 + 64 + 256 + 1024)
    assert (tmp_path / "latent_health.png").stat().st_size > 0
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"kl_00_1x1", "active_00_1x1", "active_04_32x32", "test_bits_per_dim"} <= set(header)
    assert (tmp_path / "test_curve.png").stat().st_size > 0


def test_health_monitor_warns_on_collapse_and_dominance():
    monitor = HealthMonitor(patience=2)

    def epoch(kls: dict[str, float]) -> dict[str, dict]:
        return {n: {"kl": kl, "active": int(kl > 0.5), "dims": 4} for n, kl in kls.items()}

    assert monitor.add(epoch({"a": 5.0, "b": 4.0, "c": 3.0, "d": 3.0})) == []
    assert monitor.add(epoch({"a": 5.0, "b": 0.0, "c": 3.0, "d": 3.0})) == []  # b off for 1 epoch: not yet
    warnings = monitor.add(epoch({"a": 5.0, "b": 0.0, "c": 0.1, "d": 0.1}))
    assert len(warnings) == 2
    assert "b has collapsed" in warnings[0] and "a carries 96% of the KL" in warnings[1]
    assert monitor.add(epoch({"a": 5.0, "b": 0.0, "c": 1.0, "d": 1.0})) == [], "each is reported once"
    assert monitor.summary()["collapsed"] == ["b"] and monitor.summary()["dominant"] == "a"


@pytest.mark.parametrize("rewind", [[], ["--skip-rewind"]], ids=["plain", "skip-rewind"])
def test_deep_resume_equals_an_uninterrupted_run(data, tmp_path, rewind):
    common = ["--data", data, *TINY_ARGS, "--epochs", "2", "--limit-train", "96", "--seed", "4", *rewind]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_process(*common, "--out", str(straight)).returncode == 0
    killed = run_process(*common, "--out", str(split), code=KILL_AFTER_FIRST_CHECKPOINT)
    assert "KeyboardInterrupt" in killed.stderr
    resumed = run_process(*common, "--out", str(split), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    assert_same_state(a, b)
    for key, value in a["ema"]["model"].items():
        assert torch.equal(b["ema"]["model"][key], value), key
    assert a["skip"] == b["skip"] and a["health"] == b["health"]
    assert (a["rewind"] is None) == (b["rewind"] is None) == (not rewind)
    if rewind:  # the copy of the weights and state before the last step taken
        assert all(torch.equal(x, y) for x, y in zip(a["rewind"]["saved"], b["rewind"]["saved"], strict=True))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(("shape", "factor"), [((3, 5, 4, 4), 2), ((2, 7, 1, 1), 4), ((2, 6, 8, 8), 4)])
def test_nearest_upsampling_equals_interpolate_and_keeps_channels_last(layout, shape, factor):
    """The top-down pass's upsampling: the values of ``F.interpolate(mode="nearest")`` bit for bit,
    its gradient (a sum over each block) in float64, and a channels_last input stays channels_last."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    h = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    ours = deep.upsample_nearest(h, factor)
    theirs = torch.nn.functional.interpolate(h, scale_factor=factor, mode="nearest")
    assert torch.equal(ours, theirs)
    grad = torch.randn_like(theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, h, grad)[0], torch.autograd.grad(theirs, h, grad)[0])
    if layout == "channels_last" and shape[-1] > 1:
        assert ours.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("group", [0, 3], ids=["1x1", "4x4"])  # 1x1 convs at 1x1, 3x3 convs at 4x4
def test_prior_and_posterior_as_one_equal_the_two_cells(layout, group):
    """``LatentGroup.prior_and_posterior`` (the two cells' convs as one call each, given the
    posterior's read of the activation) gives the prior cell's output on h and the posterior cell's
    on cat[h, activation]: values and the gradients of
    both inputs and of every parameter of both cells, in float64."""
    torch.manual_seed(0)
    model = DeepHVAE("small").double()
    block = model.groups[group]
    for p in block.parameters():  # the prior's last conv starts at zero; any weights will do here
        torch.nn.init.normal_(p, std=0.2)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    res = model.resolutions[group]
    h, act = (
        torch.randn(3, 64, res, res, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
        for _ in range(2)
    )

    def separate():
        return *block.prior_params(h), *block.posterior_outputs(h, act)

    def as_one():
        activation_columns = block.posterior.convs[0].weight[:, 64:]
        read = torch.nn.functional.conv2d(torch.nn.functional.gelu(act), activation_columns)
        prior, posterior = block.prior_and_posterior(h, read)
        return *prior, *posterior

    inputs = [h, act, *block.prior.parameters(), *block.posterior.parameters()]
    expected, got = separate(), as_one()
    weights = [torch.randn_like(t) for t in expected]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    def grads(outputs):
        loss = sum((w * t).sum() for w, t in zip(weights, outputs, strict=True))
        return torch.autograd.grad(loss, inputs)

    for a, b in zip(grads(got), grads(expected), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_forward_builds_no_module(monkeypatch):
    """No module is built inside the deep model's forward, with its heads as one or apart (a slice
    of an ``nn.ModuleList`` builds one: under torch.compile Dynamo traces its construction, which
    took about 1.3 s of the deep ``small`` step's tracing)."""
    model = tiny()
    built = []
    real_init = torch.nn.Module.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__init__", counting_init)
    for as_one in (True, False):
        model.heads_as_one = as_one
        model(images(2))
    assert built == []


@pytest.mark.parametrize("posterior", deep.POSTERIORS)
def test_the_model_with_heads_as_one_equals_it_with_heads_apart(posterior):
    """The whole deep model's loss terms and parameter gradients are the same (float64) with each
    group's prior and posterior as one set of convs (each resolution's posterior reads of the
    activation as one conv) and with the cells apart; the FLOP counter counts 10% more as one (the
    last conv's zero blocks, the grouped convs' backward), which is why bench_train counts apart."""
    torch.manual_seed(0)
    model = DeepHVAE(replace(PRESETS["small"], posterior=posterior)).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)

    def loss_and_grads(as_one: bool):
        model.heads_as_one = as_one
        model.zero_grad()
        torch.manual_seed(1)
        out = model(x)
        loss = out.decoded.square().mean() + sum(kl.sum() for kl in out.kls.values())
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    for a, b in zip(loss_and_grads(True), loss_and_grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    flops = {}
    for as_one in (True, False):
        with FlopCounterMode(display=False) as counter:
            loss_and_grads(as_one)
        flops[as_one] = counter.get_total_flops()
    assert 1.08 < flops[True] / flops[False] < 1.12, flops
