"""The study's three claims, and ours for its next step (each deep row), checked on measured numbers.

Each claim compares rows seed by seed (every row trains with the same seeds, so seed k of one row
pairs with seed k of another); the verdict is on the mean over seeds, and the margin and its
spread over seeds are reported with it.
"""

import statistics
from dataclasses import dataclass

from fasthvae.study.rows import DEEP_ROWS, ROWS, STUDY_ROWS

RECON, FID = "recon_bce", "fid"


@dataclass(frozen=True)
class Claim:
    name: str
    text: str
    holds: bool | None  # None: not enough measurements to tell
    detail: str


def _paired(values: dict[str, dict[int, dict]], a: str, b: str, metric: str) -> list[float]:
    """Relative differences (a / b - 1) of ``metric`` for the seeds where both rows have it."""
    seeds = sorted(set(values.get(a, {})) & set(values.get(b, {})))
    out = []
    for seed in seeds:
        va, vb = values[a][seed].get(metric), values[b][seed].get(metric)
        if va is not None and vb is not None:
            out.append(va / vb - 1)
    return out


def _percent(x: float, sign: str = "+") -> str:
    """``x`` as a percentage, one decimal; three where one would round a nonzero margin to 0.0%."""
    return f"{x:{sign}.1%}" if x == 0 or abs(x) >= 0.0005 else f"{x:{sign}.3%}"


def _spread(diffs: list[float]) -> str:
    mean = statistics.fmean(diffs)
    if len(diffs) == 1:
        return f"{_percent(mean)} (1 seed)"
    seeds = ", ".join(_percent(d) for d in diffs)
    return f"{_percent(mean)} (seeds: {seeds}; sd {_percent(statistics.stdev(diffs), '')})"


def _claim(name: str, text: str, sign: int, comparisons: dict[str, list[float]]) -> Claim:
    """Holds when every comparison's mean relative difference has the sign ``sign`` (-1: lower)."""
    if not all(comparisons.values()):
        return Claim(name, text, None, f"needs measurements of {', '.join(comparisons)}")
    holds = all(sign * statistics.fmean(diffs) > 0 for diffs in comparisons.values())
    return Claim(name, text, holds, "; ".join(f"{label}: {_spread(d)}" for label, d in comparisons.items()))


def _best(values: dict[str, dict[int, dict]], metric: str) -> str | None:
    """The study row with the lowest mean ``metric`` over its seeds."""
    means = {
        row: statistics.fmean(m[metric] for m in values[row].values() if metric in m)
        for row in STUDY_ROWS
        if any(metric in m for m in values.get(row, {}).values())
    }
    return min(means, key=means.__getitem__) if means else None


def _deep_claim(values: dict[str, dict[int, dict]], row: str) -> Claim:
    comparisons = {}
    for metric, name in ((RECON, "recon"), (FID, "FID")):
        best = _best(values, metric)
        comparisons[f"{name}, {row} vs {best or 'the best study row'}"] = (
            _paired(values, row, best, metric) if best else []
        )
    return _claim(
        "4" if row == DEEP_ROWS[0] else f"4 ({row})",
        f"(fasthvae, the study's next step) the {ROWS[row].label} beats the best of the study's rows "
        "on reconstruction and on FID",
        -1,
        comparisons,
    )


def evaluate_claims(values: dict[str, dict[int, dict]]) -> list[Claim]:
    """The claims from ``values[row][seed] = {"recon_bce": ..., "fid": ...}`` (rows by study name);
    the fourth for each deep row that has finished runs."""
    recon_ab = _paired(values, "hvae-alpha-beta", "vae", RECON)
    recon_b = _paired(values, "hvae-beta", "vae", RECON)
    fid_ab = _paired(values, "hvae-alpha-beta", "vae", FID)
    fid_b = _paired(values, "hvae-beta", "vae", FID)
    return [
        _claim(
            "1",
            "HVAE (alpha-beta) reconstructs better than the VAE (study: -8.5%)",
            -1,
            {"recon, HVAE (alpha-beta) vs VAE": recon_ab},
        ),
        _claim(
            "2",
            "HVAE (beta only) is worse than the VAE on both metrics (study: recon +9.2%, FID +14.6%)",
            +1,
            {"recon, HVAE (beta only) vs VAE": recon_b, "FID, HVAE (beta only) vs VAE": fid_b},
        ),
        _claim(
            "3",
            "the VAE has the best FID (study: 105.5 vs 116.2 and 120.9)",
            +1,
            {"FID, HVAE (beta only) vs VAE": fid_b, "FID, HVAE (alpha-beta) vs VAE": fid_ab},
        ),
    ] + [_deep_claim(values, row) for row in DEEP_ROWS if values.get(row)]
