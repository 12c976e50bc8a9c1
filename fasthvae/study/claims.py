"""The study's three claims, checked on measured numbers.

Each claim compares rows seed by seed (every row trains with the same seeds, so seed k of one row
pairs with seed k of another); the verdict is on the mean over seeds, and the margin and its
spread over seeds are reported with it.
"""

import statistics
from dataclasses import dataclass

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


def _spread(diffs: list[float]) -> str:
    mean = statistics.fmean(diffs)
    if len(diffs) == 1:
        return f"{mean:+.1%} (1 seed)"
    return f"{mean:+.1%} (seeds: {', '.join(f'{d:+.1%}' for d in diffs)}; sd {statistics.stdev(diffs):.1%})"


def evaluate_claims(values: dict[str, dict[int, dict]]) -> list[Claim]:
    """The claims from ``values[row][seed] = {"recon_bce": ..., "fid": ...}`` (rows by study name)."""
    claims = []
    d = _paired(values, "hvae-alpha-beta", "vae", RECON)
    claims.append(
        Claim(
            "1",
            "HVAE (alpha-beta) reconstructs better than the VAE (study: -8.5%)",
            statistics.fmean(d) < 0 if d else None,
            f"recon HVAE (alpha-beta) vs VAE: {_spread(d)}" if d else "needs both rows",
        )
    )
    dr = _paired(values, "hvae-beta", "vae", RECON)
    df = _paired(values, "hvae-beta", "vae", FID)
    both = statistics.fmean(dr) > 0 and statistics.fmean(df) > 0 if dr and df else None
    claims.append(
        Claim(
            "2",
            "HVAE (beta only) is worse than the VAE on both metrics (study: recon +9.2%, FID +14.6%)",
            both,
            f"HVAE (beta only) vs VAE: recon {_spread(dr)}; FID {_spread(df)}"
            if dr and df
            else "needs both rows with FID",
        )
    )
    f1 = _paired(values, "hvae-beta", "vae", FID)
    f2 = _paired(values, "hvae-alpha-beta", "vae", FID)
    best = statistics.fmean(f1) > 0 and statistics.fmean(f2) > 0 if f1 and f2 else None
    claims.append(
        Claim(
            "3",
            "the VAE has the best FID (study: 105.5 vs 116.2 and 120.9)",
            best,
            f"FID vs VAE: HVAE (beta only) {_spread(f1)}; HVAE (alpha-beta) {_spread(f2)}"
            if f1 and f2
            else "needs all three rows with FID",
        )
    )
    return claims
