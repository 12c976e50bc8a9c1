"""The fused ops in a compiled CPU graph, called without Python.

The ``fasthvae::`` Gaussian ops, the seed draw and the one-pass mixture likelihood are
``torch.library`` custom ops implemented in Python: a compiled graph that calls one goes through the
dispatcher into Python (the op's autograd layer, its CPU implementation choosing a backend and
laying out the inputs) and back into the C++ loops, tens of microseconds a call, under Inductor's
C++ wrapper too. ``fasthvae._C`` registers a ``fasthvae_cpu::`` twin of each, with the same schema and a C++
kernel that runs what the Python op runs for CPU tensors under the ``cpu`` backend (the same loops
on the same layouts: the same bits, ``tests/test_compiled_cpu.py``). :class:`CpuTwins` is an
Inductor post-grad pass that puts the twin in place of each such call; the trainer's CPU compile
options install it (``fasthvae.training.loop.compile_options``). The twins have no autograd: they
run in graphs that autograd has already been traced through.
"""

import functools
import hashlib
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from fasthvae.ops import backend

# The ops with a fasthvae_cpu twin, each with the position (in its args) of the tensor whose device
# and dtype decide whether the Python op runs the CPU loops (``backend.resolve`` naming ``cpu``);
# None: it always does (the seed draw, from PyTorch's CPU generator).
_DECIDING_ARG = {
    "gaussian_kl": 1,
    "reparameterize": 1,
    "sample_and_kl": 1,
    "gaussian_backward": 1,
    "mixture_nll_with_grad": 1,
    "cpu_seed": None,
}


@functools.cache
def _twins_registered() -> bool:
    """Whether ``fasthvae._C`` is loaded (its import registers the twins); registers their fake
    kernels, once."""
    if backend.extension() is None:
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Each twin's fake kernel is its Python op's: the same output shapes, dtypes and strides."""
    for name in _DECIDING_ARG:
        op = getattr(torch.ops.fasthvae, name).default

        def fake(*args, _op=op, **kwargs):
            return _op(*args, **kwargs)

        torch.library.register_fake(f"fasthvae_cpu::{name}", fake)


def _twins() -> dict:
    return {
        getattr(torch.ops.fasthvae, name).default: (getattr(torch.ops.fasthvae_cpu, name).default, arg)
        for name, arg in _DECIDING_ARG.items()
    }


def _runs_cpu_loops(node: torch.fx.Node, arg: int | None) -> bool:
    """Whether the Python op of ``node`` runs the C++ CPU loops on its inputs (as traced)."""
    if arg is None:
        return True
    value = node.args[arg].meta.get("val") if isinstance(node.args[arg], torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and backend.resolve(value.device, value.dtype) == "cpu"


class CpuTwins(CustomGraphPass):
    """Inductor's post-grad pass: each call of an op in ``_DECIDING_ARG`` that runs the CPU loops
    becomes a call of its ``fasthvae_cpu::`` twin."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        twins = _twins()
        for node in graph.nodes:
            if node.op != "call_function" or node.target not in twins:
                continue
            twin, arg = twins[node.target]
            if _runs_cpu_loops(node, arg):
                node.target = twin

    def uuid(self) -> str:
        """Part of Inductor's cache key: this pass's code and the backend selection it reads."""
        code = Path(__file__).read_bytes()
        return hashlib.sha256(code + backend.get_backend().encode()).hexdigest()


def cpu_twins_pass() -> CpuTwins | None:
    """The pass, where ``fasthvae._C`` is loaded (else there are no twins)."""
    return CpuTwins() if _twins_registered() else None
