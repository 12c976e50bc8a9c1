"""The compiled training step built for a CUDA GPU on a machine without one: what Triton rejects
shows here, before a GPU run.

    python -m fasthvae.selfcheck.cross_compile --model deep --preset small --batch-size 32 [--arch 90]

The step's forward and backward graphs are traced on the CPU as Inductor receives them (the
trainer's ``compile_options`` for CUDA, float32, the fused ops' reference formulas unless
``--fused-ops``), their devices rewritten to ``cuda:0``, and compiled by Inductor for CUDA with
the device described as one of compute capability ``--arch`` (an H100's or H200's properties for
Inductor's heuristics), every Triton kernel compiled to a cubin and none loaded. It prints, per
graph, the number of Triton kernels compiled or the kernel that failed with its error, and exits 1
on a failure. Needs torch built with CUDA and Triton; no GPU, no driver. Everything that stands in
for the GPU is patched into torch and Triton's internals for this process only (tested on torch
2.11 with Triton 3.6 and torch 2.14 with Triton 3.8).
"""

import argparse
import copy
import dataclasses
import sys
import types
from collections.abc import Iterator
from unittest import mock

import torch

from fasthvae.models import build_model_from_config
from fasthvae.ops.backend import use_backend
from fasthvae.training.config import TrainConfig, add_options, with_model_defaults
from fasthvae.training.loop import Objective, compile_options

CUDA = torch.device("cuda", 0)


@dataclasses.dataclass
class Graph:
    """A graph as Inductor's compiler received it, and its inputs' shapes, strides and dtypes."""

    module: torch.fx.GraphModule
    inputs: list
    backward: bool


class Traced(Exception):
    """Raised once the backward graph is captured: nothing of the step has to run further."""


def trace_step(config: TrainConfig, fused_ops: bool) -> list[Graph]:
    """The step's compiled graphs (forward, backward), traced on the CPU with CUDA's options."""
    import torch._inductor.compile_fx as compile_fx

    graphs: list[Graph] = []
    compile_on_cpu = compile_fx._compile_fx_inner

    def capture(gm, example_inputs, **kwargs):
        inputs = [
            (t.shape, t.stride(), t.dtype) if isinstance(t, torch.Tensor) else t for t in example_inputs
        ]
        backward = kwargs.get("is_backward", False)
        graphs.append(Graph(torch.fx.GraphModule(gm, copy.deepcopy(gm.graph)), inputs, backward))
        if backward:
            raise Traced
        return compile_on_cpu(gm, example_inputs, **kwargs)

    model = build_model_from_config(dataclasses.asdict(config))
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step = torch.compile(Objective(model), dynamic=False, options=compile_options(config.compile_mode, CUDA))
    x = torch.rand(config.batch_size, 3, 32, 32)
    weights = torch.ones(model.num_levels)
    with (
        use_backend("auto" if fused_ops else "reference"),
        mock.patch.object(compile_fx, "_compile_fx_inner", capture),
    ):
        try:
            step(x, weights)["loss"].backward()
        except Exception as e:  # dynamo wraps the compiler's exceptions
            if not any(isinstance(c, Traced) for c in _causes(e)):
                raise
    return graphs


def _causes(e: BaseException | None) -> Iterator[BaseException]:
    while e is not None:
        yield e
        e = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__


def _on_cuda(value):
    if isinstance(value, torch.device) and value.type == "cpu":
        return CUDA
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cuda(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_cuda(v) for k, v in value.items()}
    return value


def fake_gpu(arch: int) -> list[str]:
    """Start, for the rest of the process, the patches under which Inductor compiles for a CUDA
    device of compute capability ``arch`` that is not there: its properties, a Triton driver that
    names the target, kernels compiled and never loaded. Returns the list the compiled kernels'
    names are appended to."""
    import torch._inductor.runtime.triton_heuristics as heuristics
    import torch._subclasses.fake_tensor as fake_tensor
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    major, minor = divmod(arch, 10)
    props = types.SimpleNamespace(
        name=f"sm_{arch} (no GPU)", major=major, minor=minor, multi_processor_count=132,
        regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048, max_threads_per_block=1024,
        warp_size=32, total_memory=80 * 2**30, L2_cache_size=50 * 2**20, shared_memory_per_block_optin=232448,
        gcnArchName="",
    )  # fmt: skip

    class TargetOnly:
        """The active Triton driver's target, with no driver behind it."""

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_active_torch_device(self):
            return CUDA

    compiled: list[str] = []
    precompile = heuristics.CachingAutotuner.precompile

    def compile_only(self, *args, **kwargs):
        compiled.append(self.fn.__name__)
        return precompile(self, warm_cache_only=True)

    none = lambda *a, **k: None  # noqa: E731
    patches = [
        mock.patch("torch.cuda.is_available", lambda: True),
        mock.patch("torch.cuda.device_count", lambda: 1),
        mock.patch("torch.cuda.current_device", lambda: 0),
        mock.patch("torch.cuda._lazy_init", none),
        mock.patch("torch.cuda.get_device_properties", lambda *a, **k: props),
        mock.patch("torch.cuda._get_device_properties", lambda *a, **k: props, create=True),
        mock.patch("torch.cuda.get_device_capability", lambda *a, **k: (major, minor)),
        mock.patch("torch.cuda.get_rng_state", lambda *a, **k: torch.zeros(16, dtype=torch.uint8)),
        mock.patch("torch.cuda.set_rng_state", none),
        mock.patch("torch.cuda._exchange_device", lambda i: 0),
        mock.patch("torch.cuda._maybe_exchange_device", lambda i: 0),
        mock.patch("torch.cuda.set_device", none),
        mock.patch("torch.cuda.synchronize", none),
        mock.patch("torch._inductor.runtime.triton_helpers.set_driver_to_gpu", none),
        mock.patch("torch._inductor.scheduler.has_triton", lambda: True),
        mock.patch.object(heuristics.CachingAutotuner, "precompile", compile_only),
    ]
    if hasattr(fake_tensor, "init_gpu_context"):  # torch 2.11 makes a real CUDA tensor per device
        patches.append(mock.patch.object(fake_tensor, "init_gpu_context", none))
    for p in patches:
        p.start()
    driver.set_active(TargetOnly())
    return compiled


def compile_for_cuda(graph: Graph, compiled: list[str]) -> str:
    """One graph compiled for the faked device: a line saying how many kernels, or what failed."""
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._subclasses.fake_tensor import FakeTensorMode

    for node in graph.module.graph.nodes:
        node.args, node.kwargs = _on_cuda(node.args), _on_cuda(node.kwargs)
    graph.module.recompile()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        inputs = [
            torch.empty_strided(*i[:2], dtype=i[2], device=CUDA) if isinstance(i, tuple) else i
            for i in graph.inputs
        ]
    name = "backward" if graph.backward else "forward"
    compiled.clear()
    try:
        with mode:
            compile_fx_inner(graph.module, inputs, is_backward=graph.backward)
    except Exception as e:  # the compiler's error, whatever its type, is the result
        at = compiled[-1] if compiled else "before any kernel"
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        return f"{name}: FAILED after {len(compiled) - 1 if compiled else 0} kernels, at {at}: {error}"
    return f"{name}: {len(compiled)} Triton kernels compiled"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_options(p, ("model", "preset", "batch_size"), {"model": "deep", "batch_size": 32})
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument(
        "--fused-ops", action="store_true", help="the fused ops (Triton) instead of the reference formulas"
    )
    # Off unless given, unlike the trainer's option: the plain layout is the one the H200 failed on.
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    args = p.parse_args(argv)
    config = TrainConfig(
        model=args.model, preset=args.preset, batch_size=args.batch_size, channels_last=args.channels_last
    )
    config = with_model_defaults(config)
    graphs = trace_step(config, args.fused_ops)
    compiled = fake_gpu(args.arch)
    import torch._inductor.config as inductor_config

    failed = False
    with inductor_config.patch(compile_options(config.compile_mode, CUDA) | {"compile_threads": 1}):
        for graph in graphs:
            line = compile_for_cuda(graph, compiled)
            failed |= "FAILED" in line
            print(f"sm_{args.arch}, torch {torch.__version__}: {line}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
