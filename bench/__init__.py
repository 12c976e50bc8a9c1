"""Benchmarks against plain and torch.compile'd PyTorch, run from a source checkout's root:
``python -m bench.bench_ops``, ``bench.bench_train``, ``bench.bench_loader``, ``bench.bench_recompile``
(or ``fasthvae bench ops|train|loader``)."""
