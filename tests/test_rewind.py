"""``--skip-rewind``: the skip's decision to undo the last step taken, the exact undo of the weights
and the optimizer's state, and the trainer that rewinds through an injected burst."""

import json

import pytest
import torch
from torch import nn

from fasthvae import train
from fasthvae.optim import AdamW
from fasthvae.training.checkpoint import load_checkpoint
from fasthvae.training.grad_skip import AdaptiveSkip
from fasthvae.training.rewind import StepRewind, copy_where_
from tests.helpers import DEEP_TINY, scale_loss_by_step

TINY_ARGS = [*DEEP_TINY, "--batch-size", "16", "--limit-test", "64", "--loader", "resident", "--no-compile"]


def decisions(skip: AdaptiveSkip, norms: list[float]) -> list[tuple[bool, bool]]:
    return [tuple(bool(v) for v in skip.decide_tensor(torch.tensor(n))) for n in norms]


def test_a_burst_rewinds_once_then_a_lasting_change_of_scale_goes_on():
    skip = AdaptiveSkip(factor=10, window=100, warmup=20, patience=5, rewind=True)
    assert decisions(skip, [1.0] * 30) == [(True, False)] * 30
    burst = decisions(skip, [1e4] * 13)
    assert burst == [(False, False)] * 5 + [(False, True)] + [(False, False)] * 5 + [(True, False)] * 2
    assert skip.rewinds == 1 and skip.skipped == 11
    assert decisions(skip, [1.0]) == [(True, False)], "a step taken ends the rewind's burst"
    again = AdaptiveSkip(factor=10, window=100, warmup=20, patience=5, rewind=True)
    assert decisions(skip, [1e5] * 6)[-1] == (False, True), "a later burst rewinds again"
    again.load_state_dict(skip.state_dict())
    assert again.rewinds == 2 and bool(again.rewound) and int(again.streak) == 0
    assert decisions(again, [1e5] * 6) == [(False, False)] * 5 + [(True, False)]
    plain = AdaptiveSkip(factor=10, window=100, warmup=20, patience=5)
    decisions(plain, [1.0] * 30)
    assert decisions(plain, [1e4] * 7) == [(False, False)] * 5 + [(True, False)] * 2, "no rewind unasked"


def test_copy_where_is_exact_for_either_condition():
    g = torch.Generator().manual_seed(0)
    dst = [
        torch.randn(5, 3, generator=g) * 1e30,
        torch.randn(7, generator=g) * 1e-30,
        torch.randn((), generator=g),
    ]
    src = [torch.randn_like(t) * 1e3 for t in dst]
    before = [t.clone() for t in dst]
    copy_where_(dst, src, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(dst, before, strict=True))
    copy_where_(dst, src, torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(dst, src, strict=True))


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        tensors += [v.clone() for _, v in sorted(optimizer.state[p].items())]
    return tensors


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("flag", ["host", "tensor"])
def test_rewind_restores_the_weights_and_optimizer_state_before_the_last_step_taken(fused, flag):
    model = small_model()
    optimizer = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    rewind = StepRewind(optimizer)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def step(taken: bool) -> None:
        model(x).square().mean().backward()
        rewind.keep(taken if flag == "host" else torch.tensor(taken))
        if taken:
            optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step(True)
    before = snapshot(model, optimizer)
    step(True)  # the step to undo
    step(False)
    step(False)
    moved = snapshot(model, optimizer)
    assert not all(torch.equal(a, b) for a, b in zip(moved, before, strict=True))
    rewind.restore(False if flag == "host" else torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model, optimizer), moved, strict=True))
    rewind.restore(True if flag == "host" else torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model, optimizer), before, strict=True))
    resumed_optimizer = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed = StepRewind(resumed_optimizer)
    resumed.load_state_dict(rewind.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed.saved, rewind.saved, strict=True))
    fresh = StepRewind(AdamW(small_model().parameters(), lr=1e-2, fused=fused))  # no state yet
    with pytest.raises(ValueError, match="--skip-rewind holds 16 tensors of 4 parameters' state"):
        fresh.load_state_dict(rewind.state_dict())


def test_trainer_rewinds_through_a_burst_and_goes_on(data, tmp_path, monkeypatch):
    """Six huge steps in a row (calls 30-35): five skipped, the sixth skipped too and rewinds the
    last step taken; the run goes on."""
    scale_loss_by_step(monkeypatch, lambda n: 1e6 if 30 <= n < 36 else 1.0)
    argv = ["--data", data, "--out", str(tmp_path), *TINY_ARGS, "--epochs", "4", "--limit-train", "256"]
    assert train.main([*argv, "--skip-rewind"]) == 0  # 16 steps per epoch, 64 in all
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["skip"]["skipped"] == 6 and state["skip"]["rewinds"] == 1
    assert [r["skipped_steps"] for r in state["history"]] == [0, 3, 3, 0]
    records = [json.loads(line) for line in (tmp_path / "skips.jsonl").read_text().splitlines()]
    assert [r["rewound"] for r in records] == [False] * 5 + [True]
    assert state["rewind"] is not None and len(state["rewind"]["saved"]) > 0


def test_skip_rewind_needs_the_threshold(data, tmp_path, capsys):
    argv = ["--data", data, "--out", str(tmp_path), *TINY_ARGS, "--skip-rewind", "--skip-factor", "0"]
    assert train.main(argv) == 2
    assert "--skip-rewind acts on skips above the threshold" in capsys.readouterr().err


@pytest.mark.parametrize("beta2", [0.999, 0.9])
def test_a_gradient_spike_moves_a_weight_by_a_tenth_over_the_root_of_one_minus_beta2(beta2):
    """What --adam-beta2 documents: after many steps of small gradients, a gradient 1e6 times
    larger moves the weight by lr * 0.1 / sqrt(1 - beta2) (to 1%), for either AdamW."""
    for fused in (False, True):
        weight = nn.Parameter(torch.zeros(3))
        optimizer = AdamW([weight], lr=1e-3, betas=(0.9, beta2), fused=fused)
        for sign in [1.0, -1.0] * 5000:  # a zero mean, so the first moment is ~0 before the spike
            weight.grad = torch.full((3,), sign * 1e-3)
            optimizer.step()
        before = weight.detach().clone()
        weight.grad = torch.full((3,), 1e3)
        optimizer.step()
        moved = (before - weight.detach()) / 1e-3
        assert torch.allclose(moved, torch.full((3,), 0.1 / (1 - beta2) ** 0.5), rtol=1e-2), (fused, moved)


def test_the_trainer_builds_adamw_with_the_asked_beta2(data, tmp_path):
    config = train.parse_args(["--data", data, "--out", str(tmp_path), *TINY_ARGS, "--adam-beta2", "0.9"])
    assert train.Trainer(config).state.optimizer.param_groups[0]["betas"] == (0.9, 0.9)
    assert train.main(["--data", data, "--out", str(tmp_path), *TINY_ARGS, "--adam-beta2", "1"]) == 2
