"""The fused ops in a compiled CPU graph, called without Python.

The ``fasthvae::`` Gaussian ops, the seed draw and the one-pass mixture likelihood are
``torch.library`` custom ops implemented in Python: a compiled graph that calls one goes through the
dispatcher into Python (the op's autograd layer, its CPU implementation choosing a backend and
laying out the inputs) and back into the C++ loops, tens of microseconds a call, under Inductor's
C++ wrapper too. ``fasthvae._C`` registers ``fasthvae_cpu::`` twins of them, C++ kernels that run
what the Python op runs for CPU tensors under the ``cpu`` backend (the same loops on the same
layouts: the same bits, ``tests/test_compiled_cpu.py``). The shared backward has two twins of fixed
arity, without and with a prior: Inductor's C++ wrapper calls an op that returns a list of tensors
back through Python. :class:`CpuTwins` is an Inductor post-grad pass that puts the twin in place of
each such call; the trainer's CPU compile options install it
(``fasthvae.training.loop.compile_options``). The twins have no autograd: they run in graphs that
autograd has already been traced through.
"""

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from fasthvae.ops import backend


def _same(args: list) -> tuple:
    return tuple(args)


def _without_prior(args: list) -> tuple:
    """gaussian_backward's arguments less the prior's two (None)."""
    return (args[0], args[1], *args[4:])


@dataclass(frozen=True)
class Twin:
    """``fasthvae_cpu::{name}`` in place of a call of ``fasthvae::{python}`` that it ``takes``, with
    the arguments ``args`` makes of the Python op's. ``deciding_arg``: the position of the tensor
    whose device and dtype decide whether the Python op runs the CPU loops (``backend.resolve``
    naming ``cpu``); None: it always does (the seed draw, from PyTorch's CPU generator)."""

    name: str
    python: str
    deciding_arg: int | None
    takes: Callable[[list], bool] = lambda args: True
    args: Callable[[list], tuple] = _same


TWINS = (
    Twin("gaussian_kl", "gaussian_kl", 1),
    Twin("reparameterize", "reparameterize", 1),
    Twin("sample_and_kl", "sample_and_kl", 1),
    Twin("gaussian_backward", "gaussian_backward", 1, takes=lambda a: a[2] is None, args=_without_prior),
    Twin("gaussian_backward_with_prior", "gaussian_backward", 1, takes=lambda a: a[2] is not None),
    Twin("mixture_nll_with_grad", "mixture_nll_with_grad", 1),
    Twin("cpu_seed", "cpu_seed", None),
)


@functools.cache
def _twins_registered() -> bool:
    """Whether ``fasthvae._C`` is loaded (its import registers the twins); registers their fake
    kernels, once."""
    if backend.extension() is None:
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Each twin's fake kernel is its Python op's (as a tuple where the Python op returns a list):
    the same output shapes, dtypes and strides."""
    python = torch.ops.fasthvae

    def same(op):
        return lambda *args: op(*args)

    fakes = {twin.name: same(getattr(python, twin.python).default) for twin in TWINS if twin.args is _same}
    fakes["gaussian_backward"] = lambda mu, logvar, *rest: tuple(
        python.gaussian_backward(mu, logvar, None, None, *rest)
    )
    fakes["gaussian_backward_with_prior"] = lambda *args: tuple(python.gaussian_backward(*args))
    for name, fake in fakes.items():
        torch.library.register_fake(f"fasthvae_cpu::{name}", fake)


def _positional(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> list:
    """A call's arguments in ``op``'s schema order, keyword and default ones included."""
    args = list(args)
    for arg in op._schema.arguments[len(args) :]:
        args.append(kwargs.get(arg.name, arg.default_value))
    return args


def _runs_cpu_loops(args: list, position: int | None) -> bool:
    """Whether the Python op runs the C++ CPU loops on these arguments (as traced)."""
    if position is None:
        return True
    value = args[position].meta.get("val") if isinstance(args[position], torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and backend.resolve(value.device, value.dtype) == "cpu"


def _retarget(node: torch.fx.Node, twin: Twin, args: list) -> None:
    """Make ``node`` (a call of ``twin``'s Python op with ``args``) a call of ``twin``, with the
    traced call's fake inputs (which lowering reads) and outputs (a tuple) to match."""
    op = node.target
    node.target = getattr(torch.ops.fasthvae_cpu, twin.name).default
    node.args, node.kwargs = twin.args(args), {}
    if "eager_input_vals" in node.meta:
        fake_args, fake_kwargs = node.meta["eager_input_vals"]
        node.meta["eager_input_vals"] = (twin.args(_positional(op, fake_args, fake_kwargs)), {})
    if isinstance(node.meta.get("val"), list):
        node.meta["val"] = tuple(node.meta["val"])


class CpuTwins(CustomGraphPass):
    """Inductor's post-grad pass: each call of a ``fasthvae::`` op that runs the CPU loops becomes a
    call of the ``fasthvae_cpu::`` twin that takes it (``TWINS``)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        by_op: dict = {}
        for twin in TWINS:
            by_op.setdefault(getattr(torch.ops.fasthvae, twin.python).default, []).append(twin)
        for node in graph.nodes:
            if node.op != "call_function" or node.target not in by_op:
                continue
            args = _positional(node.target, node.args, node.kwargs)
            twin = next((t for t in by_op[node.target] if t.takes(args)), None)
            if twin is not None and _runs_cpu_loops(args, twin.deciding_arg):
                _retarget(node, twin, args)

    def uuid(self) -> str:
        """Part of Inductor's cache key: this pass's code and the backend selection it reads."""
        code = Path(__file__).read_bytes()
        return hashlib.sha256(code + backend.get_backend().encode()).hexdigest()


def cpu_twins_pass() -> CpuTwins | None:
    """The pass, where ``fasthvae._C`` is loaded (else there are no twins)."""
    return CpuTwins() if _twins_registered() else None
