"""Writes a benchmark's rows as CSV and as a Markdown table (``<stem>.csv``, ``<stem>.md``)."""

import csv
import os
from collections.abc import Callable
from pathlib import Path

# Where Inductor keeps its files, not how it compiles; Inductor sets it itself when it starts.
INDUCTOR_CACHE_DIR = "TORCHINDUCTOR_CACHE_DIR"


def inductor_environment() -> str:
    """Inductor's settings given in the environment (``TORCHINDUCTOR_*`` but its cache directory),
    as a clause for a table's intro ("" when none is)."""
    given = sorted(
        f"`{k}={v}`"
        for k, v in os.environ.items()
        if k.startswith("TORCHINDUCTOR_") and k != INDUCTOR_CACHE_DIR
    )
    return f" Inductor's settings from the environment: {', '.join(given)}." if given else ""


def write_report(
    rows: list[dict],
    stem: Path,
    header: list[str],
    cells: Callable[[dict], list[str]],
    title: str = "",
    intro: str = "",
) -> str:
    """CSV of every field, Markdown of ``header`` with ``cells(row)`` per row (under ``# title`` and
    an ``intro`` paragraph when given); returns the Markdown."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {title}", ""] if title else []
    lines += [intro, ""] if intro else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    Path(f"{stem}.md").write_text(markdown)
    return markdown
