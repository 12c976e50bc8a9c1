"""``report.md``: the machine, the missing packages, a table of the steps, then each step's
failures and the end of its log. Written again after every step (atomically), so the file on disk
always holds every finished step."""

import os
import shlex
from pathlib import Path

from fasthvae.selfcheck.steps import StepResult

_FAILING = ("FAILED", "ERROR", "XPASS")


def _section(result: StepResult, out: Path) -> list[str]:
    lines = ["", f"## {result.step.name}", "", f"Command: `{shlex.join(result.step.command)}`  "]
    if result.step.env:
        lines.append(f"Environment: `{' '.join(f'{k}={v}' for k, v in result.step.env.items())}`  ")
    status = result.status
    if status == "cut":
        status = f"cut at its cap of {result.step.cap_s:.0f} s; the tests below had finished"
    lines.append(f"Result: {status}, {result.seconds:.0f} s")
    if result.log is not None:
        lines[-1] += f"; log: `{result.log.relative_to(out)}`"
    failing = [f"- `{test}` {outcome}" for test, outcome in result.tests.items() if outcome in _FAILING]
    if failing:
        lines += ["", "Failing tests:", "", *failing]
    if result.tail:
        lines += ["", "```", result.tail, "```"]
    return lines


def write_report(
    out: Path, header: list[str], missing: list[str], results: list[StepResult], running: str | None = None
) -> Path:
    lines = ["# fasthvae GPU self-check", "", *header, ""]
    if missing:
        lines.append(f"**Missing packages** (what needs them is skipped): {', '.join(missing)}")
    else:
        lines.append("Missing packages: none.")
    lines += ["", "| step | result | seconds | cap | tests |", "|---|---|---|---|---|"]
    lines += [
        f"| {r.step.name} | {r.status} | {r.seconds:.0f} | {r.step.cap_s:.0f} | {r.counts()} |"
        for r in results
    ]
    if running:
        lines += ["", f"Running now: {running} (a report that ends here was cut during that step)."]
    for result in results:
        lines += _section(result, out)
    for table in sorted((out / "bench").glob("*.md")):
        lines += ["", f"## {table.name}", "", table.read_text()]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
