"""The study's KL schedules, pinned at the named epochs."""

import pytest

from fasthvae.schedules import Schedule, lr_factor

APPROX = pytest.approx


@pytest.mark.parametrize(
    ("epoch", "beta"),
    [(0, 0.0), (5, 0.25), (10, 0.5), (20, 1.0), (25, 1.0), (30, 1.0), (65, 0.7), (100, 0.4), (150, 0.4)],
)
def test_beta(epoch, beta):
    assert Schedule("beta").weights(epoch) == (APPROX(beta), APPROX(beta))  # alpha = beta


@pytest.mark.parametrize(
    ("epoch", "alpha", "beta"),
    [
        (0, 0.0, 0.0),
        (10, 0.0, 0.5),
        (20, 1 / 3, 1.0),
        (30, 2 / 3, 1.0),
        (40, 1.0, 0.970291),
        (70, 0.625, 0.633244),
        (100, 0.25, 0.4),
    ],
)
def test_alpha_beta(epoch, alpha, beta):
    assert Schedule("alpha-beta").weights(epoch) == (APPROX(alpha), APPROX(beta, abs=1e-6))


def test_alpha_peaks_at_40_and_never_goes_below_its_floor():
    alphas = [Schedule("alpha-beta").weights(e / 10)[0] for e in range(0, 1201)]
    assert max(alphas) == APPROX(1.0) and alphas.index(max(alphas)) == 400
    assert min(alphas[400:]) == APPROX(0.25)


def test_smooth_within_an_epoch_and_stretched():
    s = Schedule("beta", total_epochs=50)
    assert s.weights(5)[1] == APPROX(0.5)  # epoch 10 of 100 -> epoch 5 of 50
    assert s.weights(10)[1] == APPROX(1.0)
    assert s.weights(2.5)[1] == APPROX(0.25)


def test_constant_and_errors():
    assert Schedule("constant").weights(37.2) == (1.0, 1.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("cyclic")
    with pytest.raises(ValueError, match="positive"):
        Schedule("beta", total_epochs=0)


@pytest.mark.parametrize("epoch", [0, 5, 10, 17.5, 20, 30, 40, 55, 70, 100, 130])
def test_staggered_ends_are_beta_and_alpha_and_two_levels_are_alpha_beta(epoch):
    s = Schedule("staggered")
    top, *_, finest = s.level_weights(epoch, 5)
    alpha, beta = Schedule("alpha-beta").weights(epoch)
    assert (top, finest) == (APPROX(beta), APPROX(alpha))
    assert s.level_weights(epoch, 2) == [APPROX(beta), APPROX(alpha)]
    assert s.level_weights(epoch, 1) == [APPROX(beta)]


@pytest.mark.parametrize(
    ("epoch", "weight"),  # the middle level of 3 (f = 1/2): ramp 5 -> 30, hold to 35, floor 0.325
    [(0, 0.0), (5, 0.0), (17.5, 0.5), (30, 1.0), (35, 1.0), (67.5, 0.6625), (100, 0.325), (120, 0.325)],
)
def test_staggered_middle_level(epoch, weight):
    assert Schedule("staggered").level_weights(epoch, 3)[1] == APPROX(weight)


def test_staggered_lower_levels_ramp_later_and_end_lower():
    levels = [Schedule("staggered").level_weights(e / 4, 6) for e in range(0, 481)]
    for upper, lower in zip(range(5), range(1, 6), strict=True):
        assert all(w[lower] <= w[upper] + 1e-12 for w in levels[: 20 * 4])  # ramps: lower is later
        assert levels[-1][lower] < levels[-1][upper]  # floors: lower is lower


def test_level_weights_of_each_schedule():
    assert Schedule("constant").level_weights(12, 3) == [1.0, 1.0, 1.0]
    assert Schedule("beta").level_weights(10, 3) == [APPROX(0.5)] * 3
    assert Schedule("alpha-beta").level_weights(20, 3) == [APPROX(1.0), APPROX(1 / 3), APPROX(1 / 3)]
    with pytest.raises(ValueError, match="levels"):
        Schedule("beta").level_weights(1, 0)


@pytest.mark.parametrize(
    ("epoch", "factor"), [(0, 1.0), (2.5, 0.853553), (5, 0.5), (7.5, 0.146447), (10, 0.0), (12, 0.0)]
)
def test_cosine_learning_rate_falls_from_one_to_zero_over_the_run(epoch, factor):
    assert lr_factor("cosine", epoch, total_epochs=10) == APPROX(factor, abs=1e-6)
    assert lr_factor("constant", epoch, total_epochs=10) == 1.0


@pytest.mark.parametrize(("epoch", "ramp"), [(0, 0.0), (0.5, 0.25), (1, 0.5), (2, 1.0), (6, 1.0)])
def test_learning_rate_warm_up_ramps_either_schedule_from_zero(epoch, ramp):
    assert lr_factor("constant", epoch, total_epochs=10, warmup=2) == APPROX(ramp)
    assert lr_factor("cosine", epoch, total_epochs=10, warmup=2) == APPROX(
        ramp * lr_factor("cosine", epoch, 10)
    )


@pytest.mark.parametrize("name", ["constant", "beta", "staggered"])
@pytest.mark.parametrize(("epoch", "ramp"), [(0, 0.0), (0.5, 0.25), (1, 0.5), (2, 1.0), (6, 1.0)])
def test_kl_warm_up_ramps_every_level_of_any_schedule_from_zero(name, epoch, ramp):
    warm, plain = Schedule(name, 10, warmup=2), Schedule(name, 10)
    assert warm.level_weights(epoch, 3) == APPROX([ramp * w for w in plain.level_weights(epoch, 3)])
    with pytest.raises(ValueError, match="KL warm-up must be >= 0 epochs, got -1"):
        Schedule(name, 10, warmup=-1)


@pytest.mark.parametrize(("epoch", "ramping"), [(0, True), (1.99, True), (2, False), (6, False)])
def test_the_kl_warm_up_ramps_until_its_last_epoch(epoch, ramping):
    assert Schedule("constant", 10, warmup=2).warming_up(epoch) is ramping
    assert Schedule("constant", 10).warming_up(epoch) is False  # no warm-up: never ramping


def test_unknown_learning_rate_schedule():
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        lr_factor("linear", 1.0, 10)
