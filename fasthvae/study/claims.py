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


Values = dict[str, dict[int, dict]]  # values[row][seed] = {"recon_bce": ..., "fid": ...}
Comparison = tuple[str, str | None, str]  # rows a and b, the metric: a / b - 1 (b None: no such row)


def _paired(values: Values, a: str, b: str | None, metric: str) -> list[float]:
    """Relative differences (a / b - 1) of ``metric`` for the seeds where both rows have it."""
    seeds = sorted(set(values.get(a, {})) & set(values.get(b, {}))) if b else []
    out = []
    for seed in seeds:
        va, vb = values[a][seed].get(metric), values[b][seed].get(metric)
        if va is not None and vb is not None:
            out.append(va / vb - 1)
    return out


def _missing(values: Values, a: str, b: str | None) -> str:
    """Why ``a`` against ``b`` has no paired value: a row without finished runs here, no seed in
    common, or the metric not measured."""
    if b is None:
        return f"no finished run of a study row ({', '.join(STUDY_ROWS)}) in this report"
    absent = [row for row in (a, b) if not values.get(row)]
    if absent:
        return f"no finished run of {' or '.join(absent)} in this report"
    if not set(values[a]) & set(values[b]):
        return f"no seed on which both {a} and {b} finished"
    return "not measured on a seed both rows finished"


def _percent(x: float, sign: str = "+") -> str:
    """``x`` as a percentage, one decimal; three where one would round a nonzero margin to 0.0%."""
    return f"{x:{sign}.1%}" if x == 0 or abs(x) >= 0.0005 else f"{x:{sign}.3%}"


def _spread(diffs: list[float]) -> str:
    mean = statistics.fmean(diffs)
    if len(diffs) == 1:
        return f"{_percent(mean)} (1 seed)"
    seeds = ", ".join(_percent(d) for d in diffs)
    return f"{_percent(mean)} (seeds: {seeds}; sd {_percent(statistics.stdev(diffs), '')})"


def _claim(name: str, text: str, sign: int, values: Values, comparisons: dict[str, Comparison]) -> Claim:
    """Holds when every comparison's mean relative difference has the sign ``sign`` (-1: lower); not
    decided (``holds`` None) while a comparison has no paired value, the detail saying why."""
    diffs = {label: _paired(values, *c) for label, c in comparisons.items()}
    why = {label: _missing(values, *comparisons[label][:2]) for label, d in diffs.items() if not d}
    if len(why) == len(diffs) and len(set(why.values())) == 1:
        return Claim(name, text, None, next(iter(why.values())))  # one reason for every comparison
    detail = "; ".join(f"{label}: {_spread(d) if d else why[label]}" for label, d in diffs.items())
    if why:
        return Claim(name, text, None, detail)
    return Claim(name, text, all(sign * statistics.fmean(d) > 0 for d in diffs.values()), detail)


def _best(values: Values, metric: str) -> str | None:
    """The study row with the lowest mean ``metric`` over its seeds."""
    means = {
        row: statistics.fmean(m[metric] for m in values[row].values() if metric in m)
        for row in STUDY_ROWS
        if any(metric in m for m in values.get(row, {}).values())
    }
    return min(means, key=means.__getitem__) if means else None


def _deep_claim(values: Values, row: str) -> Claim:
    comparisons: dict[str, Comparison] = {}
    for metric, name in ((RECON, "recon"), (FID, "FID")):
        best = _best(values, metric)
        comparisons[f"{name}, {row} vs {best or 'the best study row'}"] = (row, best, metric)
    return _claim(
        "4" if row == DEEP_ROWS[0] else f"4 ({row})",
        f"(fasthvae, the study's next step) the {ROWS[row].label} beats the best of the study's rows "
        "on reconstruction and on FID",
        -1,
        values,
        comparisons,
    )


def evaluate_claims(values: Values) -> list[Claim]:
    """The claims from ``values[row][seed] = {"recon_bce": ..., "fid": ...}`` (rows by study name);
    the fourth for each deep row that has finished runs."""
    ab, b, vae = "hvae-alpha-beta", "hvae-beta", "vae"
    return [
        _claim(
            "1",
            "HVAE (alpha-beta) reconstructs better than the VAE (study: -8.5%)",
            -1,
            values,
            {"recon, HVAE (alpha-beta) vs VAE": (ab, vae, RECON)},
        ),
        _claim(
            "2",
            "HVAE (beta only) is worse than the VAE on both metrics (study: recon +9.2%, FID +14.6%)",
            +1,
            values,
            {
                "recon, HVAE (beta only) vs VAE": (b, vae, RECON),
                "FID, HVAE (beta only) vs VAE": (b, vae, FID),
            },
        ),
        _claim(
            "3",
            "the VAE has the best FID (study: 105.5 vs 116.2 and 120.9)",
            +1,
            values,
            {"FID, HVAE (beta only) vs VAE": (b, vae, FID), "FID, HVAE (alpha-beta) vs VAE": (ab, vae, FID)},
        ),
    ] + [_deep_claim(values, row) for row in DEEP_ROWS if values.get(row)]
