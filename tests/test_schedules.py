"""The study's KL schedules, pinned at the named epochs."""

import pytest

from fasthvae.schedules import Schedule

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
