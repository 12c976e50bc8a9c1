"""The ``fasthvae`` command: one entry point for everything, each subcommand the same as its
``python -m`` form.

    fasthvae train ...            = python -m fasthvae.train ...
    fasthvae eval RUN ...         = python -m fasthvae.eval RUN ...
    fasthvae study ...            = python -m fasthvae.study ...
    fasthvae bench ops|train|loader ...  = python -m bench.bench_ops ... (a source checkout's bench/)
    fasthvae env                  what a bug report needs
    fasthvae --version
"""

import runpy
import sys
from collections.abc import Callable
from pathlib import Path

from fasthvae.version import __version__

BENCHES = ("ops", "train", "loader")
BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def _train(argv: list[str]) -> int:
    from fasthvae.train import main

    return main(argv)


def _eval(argv: list[str]) -> int:
    from fasthvae.eval.__main__ import main

    return main(argv)


def _study(argv: list[str]) -> int:
    from fasthvae.study.__main__ import main

    return main(argv)


def _bench(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        print(f"usage: fasthvae bench {{{','.join(BENCHES)}}} [options]", file=sys.stderr)
        return 2
    script = BENCH_DIR / f"bench_{argv[0]}.py"
    if not script.is_file():
        print(
            f"fasthvae bench: error: {script} is missing: the benchmarks live in the source checkout's "
            "bench/ (git clone the repository and pip install -e it)",
            file=sys.stderr,
        )
        return 2
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(BENCH_DIR.parent))  # as `python -m bench...` from the checkout has it
    try:
        runpy.run_module(f"bench.bench_{argv[0]}", run_name="__main__", alter_sys=True)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


def _env(argv: list[str]) -> int:
    from fasthvae.env import report

    print(report())
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": _train,
    "eval": _eval,
    "study": _study,
    "bench": _bench,
    "env": _env,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--version", "-V"):
        print(f"fasthvae {__version__}")
        return 0
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
