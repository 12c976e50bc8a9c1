"""Running one step: a subprocess in its own process group, its output streamed to a log file
(so a step killed at its cap keeps what it printed), and the per-test results read back."""

import os
import re
import shlex
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fasthvae.selfcheck.plan import Step

# pytest -v lines, serially "tests/x.py::test[id] PASSED [ 10%]", under xdist
# "[gw0] [ 10%] PASSED tests/x.py::test" (no percentage in the classic console style); ids may hold
# spaces ("test[(0, 3)]").
_OUTCOME = "(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)"
_SERIAL = re.compile(rf"^(tests/\S+::.+?) {_OUTCOME}\b")
_XDIST = re.compile(rf"^\[gw\d+\] (?:\[\s*\d+%\] )?{_OUTCOME} (tests/\S+::.*?)\s*$")
_COLLECTED = re.compile(r"^(tests/\S+::.*\S)$")  # --collect-only -q (ids may hold spaces)
# The summaries after the results ("=== warnings summary ===") name tests too: reading stops there.
_SUMMARY = re.compile(r"^=+ (warnings summary|short test summary info|FAILURES|ERRORS) =+$")
KILL_GRACE_S = 5.0


@dataclass
class StepResult:
    """How a step ended: ``passed``, ``failed`` (non-zero exit), ``cut`` (killed at its cap) or
    ``not run``; its seconds, the last lines of its log and, for pytest, each finished test."""

    step: Step
    status: str
    seconds: float = 0.0
    exit_code: int | None = None
    tail: str = ""
    tests: dict[str, str] = field(default_factory=dict)
    log: Path | None = None

    def counts(self) -> str:
        """The finished tests by outcome, e.g. "1 failed, 3 passed" ("" for a step without tests)."""
        by_outcome = Counter(self.tests.values())
        return ", ".join(f"{n} {outcome.lower()}" for outcome, n in sorted(by_outcome.items()))


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def finished_tests(log_text: str) -> dict[str, str]:
    """Each finished test of a pytest -v log and its outcome (collected tests: ``COLLECTED``)."""
    results = {}
    for line in log_text.splitlines():
        if _SUMMARY.match(line):
            break
        if serial := _SERIAL.match(line):
            results[serial.group(1)] = serial.group(2)
        elif xdist := _XDIST.match(line):
            results[xdist.group(2)] = xdist.group(1)
        elif collected := _COLLECTED.match(line):
            results[collected.group(1)] = "COLLECTED"
    return results


def _stop(proc: subprocess.Popen) -> None:
    """End the step and everything it started: SIGTERM to its group, SIGKILL after a grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, cwd: Path, logs: Path, seconds_left: float, env: dict[str, str]) -> StepResult:
    """Run ``step`` in ``cwd`` for at most ``min(step.cap_s, seconds_left)`` seconds."""
    limit = min(step.cap_s, seconds_left)
    if limit < 5:
        return StepResult(step, "not run", tail="the check's budget was spent")
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{slug(step.name)}.log"
    start = time.monotonic()
    with open(log, "w") as sink:
        sink.write(f"$ {shlex.join(step.command)}\n")
        sink.flush()
        proc = subprocess.Popen(
            step.command,
            cwd=cwd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**env, **step.env},
            start_new_session=True,  # its own process group: a kill reaches its children too
        )
        try:
            code = proc.wait(timeout=limit)
            status = "passed" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop(proc)
            code, status = None, "cut"
    text = log.read_text(errors="replace")
    result = StepResult(
        step, status, time.monotonic() - start, code, "\n".join(text.splitlines()[-30:]), log=log
    )
    if step.pytest:
        result.tests = finished_tests(text)
    return result
