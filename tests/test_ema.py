"""The EMA of the weights: its rate schedule, its values, and a skipped step leaving it as it was."""

import pytest
import torch
from torch import nn

from fasthvae.training.ema import EMA


def test_the_average_follows_its_formula_and_skips_leave_it():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    ema = EMA(model, rate=0.9)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n, taken in enumerate([True, True, False, True, True]):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, torch.tensor(taken))
        if taken:
            n_before = torch.tensor(ema.updates - 1, dtype=torch.float32)  # the count lives in float32
            weight = float(1 - torch.clamp((1 + n_before) / (10 + n_before), max=0.9))
            for k, v in model.state_dict().items():
                expected[k] = expected[k] + weight * (v - expected[k])
        for k, v in ema.model.state_dict().items():
            torch.testing.assert_close(v, expected[k], rtol=1e-12, atol=1e-12, msg=f"update {n}: {k}")
    assert ema.updates == 4, "skipped steps do not count"


def test_a_rate_outside_zero_one_is_named():
    with pytest.raises(ValueError, match="EMA rate"):
        EMA(nn.Linear(1, 1), rate=1.0)
