"""``fasthvae.optim.AdamW`` and ``ops.multi_tensor_adamw_``: torch's AdamW rule in one call per
parameter group, against torch.optim.AdamW (fused and in float64), found_inf skips, state dicts both
ways, and the fallbacks to torch's own step."""

import pytest
import torch

from fasthvae import ops, train
from fasthvae.ops import backend, reference
from fasthvae.optim import AdamW
from tests.helpers import DEEP_TINY, needs_extension, torch_threads

pytestmark = needs_extension
# one channels_last, one of three blocks of the loops, odd and 0-dim ones
SHAPES = [(64, 16, 3, 3), (2, 35_001), (7,), (5, 3), (1, 1, 1, 1), ()]
HYPER = {"lr": 3e-3, "betas": (0.9, 0.99), "weight_decay": 0.05, "eps": 1e-8}


def parameters(dtype=torch.float32, seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    params[0].data = params[0].data.contiguous(memory_format=torch.channels_last)
    return params


def set_grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (
            (torch.randn(p.shape, generator=g) * (step + 1))
            .to(p.dtype)
            .contiguous(memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format)
        )


def run(optimizer_cls, params, steps=6, lrs=None, **kwargs):
    opt = optimizer_cls(params, **{**HYPER, **kwargs})
    for step in range(steps):
        if lrs:
            opt.param_groups[0]["lr"] = lrs[step]
        set_grads(params, step)
        opt.step()
    return opt


def test_the_rule_of_torch_adamw_in_float64(loops_taken):
    """float32 parameters and moments against torch's AdamW run in float64 from the same start."""
    ours = parameters()
    exact = [torch.nn.Parameter(p.detach().double()) for p in ours]
    lrs = [3e-3, 1e-3, 5e-3, 2e-3, 2e-3, 1e-4]  # a schedule: lr changes between steps
    opt = run(AdamW, ours, lrs=lrs, fused=True)
    ref = run(torch.optim.AdamW, exact, lrs=lrs, foreach=False)
    assert loops_taken == [True] * 6
    for p, q in zip(ours, exact, strict=True):
        torch.testing.assert_close(p.detach().double(), q.detach(), rtol=2e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            # a moment near 0 is a difference of terms up to ~20 (the gradients): a few of their ulps
            scale = ref.state[q][key].abs().max().item()
            torch.testing.assert_close(
                opt.state[p][key].double(), ref.state[q][key], rtol=2e-6, atol=scale * 2**-21
            )
        assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].item() == 6
    assert ours[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_other_dtypes_follow_torch(dtype):
    ours, theirs = parameters(dtype), parameters(dtype)
    run(AdamW, ours, fused=True)
    run(torch.optim.AdamW, theirs, fused=True)
    tol = {torch.float64: 1e-12, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


def test_close_to_torch_fused_and_equal_on_any_thread_count():
    results = []
    for n in (1, 5):
        with torch_threads(n):
            ours = parameters()
            run(AdamW, ours, fused=True)
        results.append(ours)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    theirs = parameters()
    run(torch.optim.AdamW, theirs, fused=True)
    for p, q in zip(results[0], theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_found_inf_skips_the_step_whole():
    params = parameters()
    opt = run(AdamW, params, steps=2, fused=True)
    before = [t.clone() for p in params for t in (p.detach(), *opt.state[p].values())]
    set_grads(params, 5)
    opt.found_inf = torch.ones(())
    opt.step()
    after = [t for p in params for t in (p.detach(), *opt.state[p].values())]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    opt.found_inf = torch.zeros(())
    opt.step()
    assert all(opt.state[p]["step"].item() == 3 for p in params)


def test_state_dicts_go_both_ways_with_torch():
    """Three steps of ours then three of torch's from our state dict, against six of torch's alone
    (and the other way round)."""
    for first, second in ((AdamW, torch.optim.AdamW), (torch.optim.AdamW, AdamW)):
        mixed, plain = parameters(), parameters()
        opt = run(first, mixed, steps=3, fused=True)
        follow = second(mixed, **HYPER, fused=True)
        follow.load_state_dict(opt.state_dict())
        for step in range(3, 6):
            set_grads(mixed, step)
            follow.step()
        run(torch.optim.AdamW, plain, fused=True)
        for p, q in zip(mixed, plain, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs", [{"fused": False}, {"fused": True, "amsgrad": True}], ids=str)
def test_other_settings_are_torch_own_step(loops_taken, kwargs):
    ours, theirs = parameters(), parameters()
    run(AdamW, ours, **kwargs)
    run(torch.optim.AdamW, theirs, **kwargs)
    assert loops_taken == []
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs, strict=True))


def test_a_parameter_without_gradient_takes_torch_step_then_the_loops_again(loops_taken):
    params = parameters()
    opt = AdamW(params, **HYPER, fused=True)
    set_grads(params, 0)
    params[2].grad = None
    opt.step()  # torch's step: the others only
    assert loops_taken == [] and not opt.state[params[2]]
    set_grads(params, 1)
    opt.step()
    assert loops_taken == [True] and opt.state[params[2]]["step"].item() == 1
    assert opt.state[params[0]]["step"].item() == 2


def test_the_op_names_bad_lists():
    p = [torch.zeros(3)]
    with pytest.raises(ValueError, match="lists differ in length"):
        ops.multi_tensor_adamw_(p, p, p, p, [], lr=0.1)
    with pytest.raises(RuntimeError, match="alike at each index"):
        backend.extension().multi_tensor_adamw_(
            p, [torch.zeros(4)], p, p, [torch.zeros(())], 0.1, 0.9, 0.99, 0.0, 1e-8, None
        )


def test_reference_op_is_torch_adamw():
    """The reference (the fallback of the op) against torch.optim.AdamW's single-tensor step."""
    ours, theirs = parameters(), parameters()
    states = [(torch.zeros_like(p), torch.zeros_like(p), torch.zeros(())) for p in ours]
    for step in range(3):
        set_grads(ours, step)
        with torch.no_grad():
            reference.multi_tensor_adamw_(
                ours, [p.grad for p in ours], *([s[i] for s in states] for i in range(3)),
                HYPER["lr"], *HYPER["betas"], HYPER["weight_decay"], HYPER["eps"],
            )  # fmt: skip
    run(torch.optim.AdamW, theirs, steps=3, foreach=False)
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs, strict=True))


def test_a_closure_runs_before_the_gradients_are_read():
    ours, theirs = parameters(), parameters()
    for cls, params in ((AdamW, ours), (torch.optim.AdamW, theirs)):
        opt = cls(params, **HYPER, fused=True)

        def closure(params=params):
            set_grads(params, 3)
            return 1.5

        assert opt.step(closure) == 1.5
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_group_added_later_is_stepped(loops_taken):
    first, later = parameters()[:3], parameters(seed=1)[3:]
    opt = AdamW(first, **HYPER, fused=True)
    set_grads(first, 0)
    opt.step()
    opt.add_param_group({"params": later})
    set_grads(first + later, 1)
    opt.step()
    assert all(opt.state[p]["step"].item() == 1 for p in later) and loops_taken == [True, True, True]


def test_the_trainers_cpu_step_takes_the_one_call_adamw(data, tmp_path, monkeypatch, loops_taken):
    """The trainer's own step (channels_last, as its CPU defaults: the deep model's parameters
    include a [1, C, 1, 1] one) steps every parameter with one multi-tensor call, on the loops."""
    calls, real = [], ops.multi_tensor_adamw_
    monkeypatch.setattr(
        ops, "multi_tensor_adamw_", lambda params, *a, **k: calls.append(len(params)) or real(params, *a, **k)
    )
    argv = ["--data", data, "--out", str(tmp_path), *DEEP_TINY, "--batch-size", "16", "--epochs", "1"]
    t = train.Trainer(
        train.parse_args([*argv, "--no-compile", "--channels-last", "--fused-optimizer", "--no-tensorboard"])
    )
    x = next(iter(t.loader))[0]
    before = [p.detach().clone() for p in t.model.parameters()]
    for _ in range(2):
        t.step_fn(x, torch.ones(t.model.num_levels))
    assert calls == [len(before)] * 2 and loops_taken and all(loops_taken)
    assert all(not torch.equal(p, q) for p, q in zip(t.model.parameters(), before, strict=True))
