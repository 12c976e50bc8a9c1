"""NaN forensics: what made a step skip, kept in ``skips.jsonl``, and the likely cause when skips
pile up.

A step is skipped when its loss or gradients are non-finite, or its gradient norm is above the
adaptive threshold. The record names the first term of the objective that went non-finite (the
reconstruction, then each KL group in the model's order), else the first parameter (in module order) whose
gradient did, else (a threshold skip) the parameter with the largest gradient norm; with the step,
the gradient norm and threshold, the loss scale, the schedule's weights, and whether the step undid
the last one taken (``--skip-rewind``).
"""

import json
import math
from collections import Counter
from pathlib import Path

NON_FINITE, ABOVE_THRESHOLD = "non-finite", "above threshold"


def diagnose(
    terms: dict[str, float],
    order: list[str],
    param_norms: dict[str, float],
    norm: float,
    threshold: float | None,
    loss_scale: float | None,
) -> dict:
    """Why a step was skipped, from its terms (``order``: the objective's terms in the order to
    blame them), the gradient norm of each parameter and the total, the threshold and loss scale."""
    bad_terms = [name for name in order if not math.isfinite(terms[name])]
    if not bad_terms and not math.isfinite(terms["loss"]):
        bad_terms = ["loss"]
    non_finite = bool(bad_terms) or not math.isfinite(norm)
    if non_finite:
        parameter = next((name for name, n in param_norms.items() if not math.isfinite(n)), None)
    else:
        parameter = max(param_norms, key=param_norms.__getitem__) if param_norms else None
    return {
        "reason": NON_FINITE if non_finite else ABOVE_THRESHOLD,
        "term": bad_terms[0] if bad_terms else None,
        "non_finite_terms": bad_terms,
        "parameter": parameter,
        "grad_norm": norm,
        "threshold": threshold,
        "loss_scale": loss_scale,
    }


def likely_cause(records: list[dict]) -> str:
    """One sentence on the most common failure among ``records`` (the recent skips)."""
    if not records:
        return "no skipped step was recorded"
    kinds = Counter(_kind(r) for r in records)
    kind, count = kinds.most_common(1)[0]
    share = f"{count} of the last {len(records)} skips"
    example = next(r for r in reversed(records) if _kind(r) == kind)
    if kind == "recon":
        return (
            f"the reconstruction term went non-finite ({share}): the decoder's output overflows; "
            "with --amp-dtype fp16 try bf16, else lower --lr"
        )
    if kind == "loss":
        return (
            f"the loss went non-finite while each of its terms was finite ({share}): the KL weights "
            "times the terms overflow; lower --lr"
        )
    if kind.startswith("kl"):
        return (
            f"{kind} went non-finite first ({share}): that latent group's posterior or prior "
            "log-variance is blowing up; lower --lr or --grad-clip"
        )
    if kind == "gradient":
        scale = f" at loss scale {example['loss_scale']:g}" if example["loss_scale"] else ""
        return (
            f"the gradient of {example['parameter']} went non-finite while the loss was finite "
            f"({share}{scale}): an overflow in the backward pass; try --amp-dtype bf16 or a lower --lr"
        )
    return (
        f"gradient norms keep exceeding the adaptive threshold ({share}, last {example['grad_norm']:.4g} "
        f"above {example['threshold']:.4g}, largest in {example['parameter']}): the model is diverging "
        "(lower --lr) or the threshold is too tight (raise --skip-factor)"
    )


def _kind(record: dict) -> str:
    if record["term"] is not None:
        return record["term"]
    return "gradient" if record["reason"] == NON_FINITE else "threshold"


class SkipLog:
    """Skipped steps of the run: appended to ``path`` (None: not written, other DDP ranks) and
    summarized per epoch."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.epoch_records: list[dict] = []
        self.recent: list[dict] = []

    def add(self, record: dict) -> None:
        self.epoch_records.append(record)
        self.recent = [*self.recent[-99:], record]
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def took_step(self) -> None:
        """A step was taken: the run of consecutive skips is over."""
        self.recent = []

    def end_epoch(self) -> str | None:
        """One line on this epoch's skips (None if there were none); starts the next epoch's count."""
        records, self.epoch_records = self.epoch_records, []
        if not records:
            return None
        kinds = Counter(_kind(r) for r in records)
        parts = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
        rewinds = sum(bool(r.get("rewound")) for r in records)
        undone = f", {rewinds} undoing the last step taken" if rewinds else ""
        return f"{len(records)} skipped step(s) ({parts}{undone}; see skips.jsonl)"
