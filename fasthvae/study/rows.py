"""The study's rows: a name, the model and KL schedule it trains, and the study's own numbers.

A row is a training config minus the protocol (data, epochs, batch, lr, seed, FID) that every row
shares. New rows (the deep model, say) are added with :func:`register_row`, and a row that
changes another's config with :func:`register_variant`.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from fasthvae.models.deep import PRESETS


@dataclass(frozen=True)
class Row:
    """One row of the study's table.

    ``config`` holds the :class:`fasthvae.train.TrainConfig` fields that make this row (``model``,
    ``schedule``, sizes, ...; ``epochs`` too where the row trains for another number of epochs);
    ``study_recon`` and ``study_fid`` are the study's reported numbers, if it has the row (its
    reconstruction loss has no stated unit). ``budget_row``: the row trains for at most the
    wall-clock training time of that row's run with the same seed (a ``--time-limit``).
    """

    name: str
    label: str
    config: Mapping[str, object]
    study_recon: float | None = None
    study_fid: float | None = None
    budget_row: str | None = None

    def epochs(self, protocol_epochs: int) -> int:
        """The epochs this row's runs train for (at most, under a time budget)."""
        return int(self.config.get("epochs", protocol_epochs))

    def __post_init__(self) -> None:
        if "model" not in self.config or "schedule" not in self.config:
            raise ValueError(f"row {self.name!r}: its config must name a model and a schedule")
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))


ROWS: dict[str, Row] = {}
BASELINE = "vae"  # the row every other row is compared with (ratios cancel the study's unknown units)


def register_row(row: Row) -> Row:
    """Make ``row`` runnable as ``--rows NAME``; names are unique."""
    if row.name in ROWS:
        raise ValueError(f"a study row named {row.name!r} exists already")
    ROWS[row.name] = row
    return row


def register_variant(name: str, label: str, parent: str, changes: Mapping[str, object]) -> Row:
    """A row that trains ``parent``'s config with ``changes``, under ``parent``'s time budget."""
    base = ROWS[parent]
    return register_row(Row(name, label, dict(base.config) | dict(changes), budget_row=base.budget_row))


def select_rows(names: list[str]) -> list[Row]:
    """Rows by name, in the order given; a clear error names the unknown ones."""
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise ValueError(f"unknown study row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a study row is named twice in {names}")
    return [ROWS[n] for n in names]


register_row(Row("vae", "VAE", {"model": "vae", "schedule": "beta"}, 30_291, 105.5))
register_row(Row("hvae-beta", "HVAE (beta only)", {"model": "hvae", "schedule": "beta"}, 33_069, 120.9))
register_row(
    Row("hvae-alpha-beta", "HVAE (alpha-beta)", {"model": "hvae", "schedule": "alpha-beta"}, 27_717, 116.2)
)
STUDY_ROWS = ("vae", "hvae-beta", "hvae-alpha-beta")
# The study's next step: the deep HVAE given the VAE's training time on the same machine (the time
# limit stops it before an epoch that would not fit), trained as VDVAE trains (plain ELBO, discretized
# mixture of logistics, so bits/dim; its reconstruction metrics are of the mixture's mean image). The
# first 2,000 test images' bits/dim after every epoch give its bits/dim against training time. The
# row names the preset's layout, width and zdim, so a table made with another `small` is not pooled
# with it. Why each later row is defined as it is, and what it measured: results/study/NOTES.md.
SMALL_DEEP = {
    "model": "deep",
    "preset": "small",
    "layout": PRESETS["small"].layout,
    "width": PRESETS["small"].width,
    "zdim": PRESETS["small"].zdim,
}
register_row(
    Row(
        "deep",
        "Deep HVAE (small)",
        SMALL_DEEP | {"schedule": "constant", "likelihood": "mixture", "test_every_epoch": 2000},
        budget_row="vae",
    )
)
# The same model under the study's own protocol: its likelihood (BCE) and the alpha-beta idea across
# the hierarchy (`staggered`), stretched over the 14 epochs that fit in the VAE's time; no EMA of the
# weights (a 0.999 average lags a model whose KL weights still move in its last epochs).
register_row(
    Row(
        "deep-bce",
        "Deep HVAE (small), BCE, staggered",
        SMALL_DEEP | {"schedule": "staggered", "epochs": 14, "ema": 0.0},
        budget_row="vae",
    )
)
# `deep-bce` with the learning rate annealed from 1e-3 to 0 over its 14 epochs (cosine).
register_variant(
    "deep-bce-cosine",
    "Deep HVAE (small), BCE, staggered, cosine lr",
    "deep-bce",
    {"lr_schedule": "cosine"},
)
# `deep-bce` with its KL schedule stretched over the first 10 of its 14 epochs, then held at its
# final weights, so the reconstruction can settle at them.
register_variant(
    "deep-bce-hold",
    "Deep HVAE (small), BCE, staggered over 10 of 14 epochs",
    "deep-bce",
    {"schedule_epochs": 10},
)
# The `deep` row with more updates in the same time: batch 32, a learning rate of 3e-3 after a
# linear warm-up over the first 0.1 epoch, annealed to 0 by a cosine over the 8 epochs that fit.
register_variant(
    "deep-fast",
    "Deep HVAE (small), batch 32, cosine lr",
    "deep",
    {"batch_size": 32, "lr": 3e-3, "lr_warmup": 0.1, "lr_schedule": "cosine", "epochs": 8},
)
# `deep-fast` with every group's KL weight ramped linearly from 0 to 1 over the first epoch (NVAE's
# KL warm-up, against latent groups that collapse early).
register_variant(
    "deep-fast-klw",
    "Deep HVAE (small), batch 32, cosine lr, KL warm-up",
    "deep-fast",
    {"kl_warmup": 1.0},
)
# `deep-fast-klw`'s recipe over the 14 epochs that fit in the budget at the compiled step's ~290
# images/s on 2 AVX-512 cores (8 fitted at the ~150 images/s the step ran at when it was defined).
register_variant(
    "deep-long",
    "Deep HVAE (small), batch 32, cosine lr over 14 epochs, KL warm-up",
    "deep-fast-klw",
    {"epochs": 14},
)
# `deep-long` with a 32x32 latent group in place of the 32x32 cell and two of the 8x8 groups moved
# to 16x16 (a screen of a quarter of the budget: 0.03 bits/dim ahead of `small` in less time), its
# cosine over the 11 epochs that fit at ~1.3x the time per epoch.
register_variant(
    "deep-hires",
    "Deep HVAE (small, 32x32 latents), batch 32, cosine lr over 11 epochs, KL warm-up",
    "deep-long",
    {"layout": "1x2,4x4,8x4,16x4,32x1", "epochs": 11},
)
# `deep-hires` with 16 channels in each latent group instead of 8 and batch 16 (a screen of a
# quarter of the budget: zdim 16 0.034 bits/dim ahead at the same time per epoch; batch 16 on it a
# further 0.104 ahead after three epochs at ~1.35x the time per epoch, and 0.023 ahead after two,
# in 3/4 of the time; 32 channels and a second 32x32 group fell behind), its cosine over the 9
# epochs that fit.
register_variant(
    "deep-hires-z16-b16",
    "Deep HVAE (small, 32x32 latents, zdim 16), batch 16, cosine lr over 9 epochs, KL warm-up",
    "deep-hires",
    {"zdim": 16, "batch_size": 16, "epochs": 9},
)
# `deep-hires-z16-b16` over the 10 epochs that fit at the step with its convolutions on oneDNN called
# directly (0.85-0.88x the step's time at batch 16 on 2 AVX-512 cores; 9 fitted before).
register_variant(
    "deep-z16-b16-long",
    "Deep HVAE (small, 32x32 latents, zdim 16), batch 16, cosine lr over 10 epochs, KL warm-up",
    "deep-hires-z16-b16",
    {"epochs": 10},
)
# `deep-z16-b16-long` over 11 epochs: its two seeds' epochs took 208-259 s, so 11 fit in the budget
# with 3.8 minutes to spare at the slower seed's pace.
register_variant(
    "deep-z16-b16-e11",
    "Deep HVAE (small, 32x32 latents, zdim 16), batch 16, cosine lr over 11 epochs, KL warm-up",
    "deep-z16-b16-long",
    {"epochs": 11},
)
# `deep-z16-b16-e11` with free bits: each KL term of the loss floored at 0.01 nats per latent
# dimension of its group (a two-epoch screen at the seed that loses two 16x16 groups in its first
# epoch: one of them kept alive from the start, 0.044 bits/dim ahead after two epochs).
register_variant(
    "deep-z16-b16-e11-fb",
    "Deep HVAE (small, 32x32 latents, zdim 16), batch 16, cosine lr over 11 epochs, KL warm-up, "
    "free bits 0.01",
    "deep-z16-b16-e11",
    {"free_bits": 0.01},
)
# `deep-z16-b16-e11` with two 16x16 latent groups instead of four (0.83x the FLOPs, 0.86x the
# compiled step's time at batch 16 on 2 AVX-512 cores, one process, alternating windows), its cosine
# over the 13 epochs that time fits.
register_variant(
    "deep-z16-b16-16x2-e13",
    "Deep HVAE (small, 32x32 latents, zdim 16, two 16x16 groups), batch 16, cosine lr over 13 "
    "epochs, KL warm-up",
    "deep-z16-b16-e11",
    {"layout": "1x2,4x4,8x4,16x2,32x1", "epochs": 13},
)
# `deep-z16-b16-e11` with KL balancing during its one-epoch KL warm-up (a two-epoch screen at the
# seed that loses two 16x16 groups in its first epoch: all four kept, 0.140 bits/dim ahead after
# two epochs).
register_variant(
    "deep-z16-b16-e11-klb",
    "Deep HVAE (small, 32x32 latents, zdim 16), batch 16, cosine lr over 11 epochs, KL warm-up, KL balancing",
    "deep-z16-b16-e11",
    {"kl_balance": True},
)
# `deep-z16-b16-e11-klb` with the residual posterior (q's cell gives offsets from its prior's): a
# screen at seed 1 passed the fourth epoch, where balancing alone diverged, with no step skipped,
# 0.161 bits/dim ahead of `deep-z16-b16-e11`'s seed 1 after four epochs.
register_variant(
    "deep-z16-b16-e11-rp-klb",
    "Deep HVAE (small, 32x32 latents, zdim 16), batch 16, cosine lr over 11 epochs, KL warm-up, KL "
    "balancing, residual posterior",
    "deep-z16-b16-e11",
    {"kl_balance": True, "posterior": "residual"},
)
# `deep-z16-b16-e11-rp-klb` over 12 epochs: balancing and the residual posterior cost nothing
# measurable on the step (0.99x `deep-z16-b16-e11`'s, 2 AVX-512 cores, rotating windows), and at
# that row's mean epoch (228-230 s) 12 epochs take 45.7-46.0 of the budget's 47.6 minutes.
register_variant(
    "deep-z16-b16-e12-rp-klb",
    "Deep HVAE (small, 32x32 latents, zdim 16), batch 16, cosine lr over 12 epochs, KL warm-up, KL "
    "balancing, residual posterior",
    "deep-z16-b16-e11-rp-klb",
    {"epochs": 12},
)
# `deep-z16-b16-e12-rp-klb` with the rewind: its seed 0 lost a 4x4 group and 0.15 bits/dim after a
# burst in its second epoch that the skip's patience ended by taking a gradient of norm 1e11.
register_variant(
    "deep-z16-b16-e12-rp-klb-rw",
    "Deep HVAE (small, 32x32 latents, zdim 16), batch 16, cosine lr over 12 epochs, KL warm-up, KL "
    "balancing, residual posterior, a burst of skips rewinds the last step",
    "deep-z16-b16-e12-rp-klb",
    {"skip_rewind": True},
)
# `deep-z16-b16-e12-rp-klb` with AdamW's beta2 at VDVAE's 0.9: a burst's gradient, once taken,
# moves the weights by a tenth of what it does at 0.999.
register_variant(
    "deep-z16-b16-e12-rp-klb-b09",
    "Deep HVAE (small, 32x32 latents, zdim 16), batch 16, cosine lr over 12 epochs, KL warm-up, KL "
    "balancing, residual posterior, AdamW beta2 0.9",
    "deep-z16-b16-e12-rp-klb",
    {"adam_beta2": 0.9},
)
# `deep-z16-b16-e12-rp-klb-b09` over the 5 epochs that fit the `vae` row's training time on the
# Intel Xeon (24.7 minutes; its step there takes 83 ms at batch 16, results/bench/budget_cpu_*).
register_variant(
    "deep-z16-b16-e5-rp-klb-b09",
    "Deep HVAE (small, 32x32 latents, zdim 16), batch 16, cosine lr over 5 epochs, KL warm-up, KL "
    "balancing, residual posterior, AdamW beta2 0.9",
    "deep-z16-b16-e12-rp-klb-b09",
    {"epochs": 5},
)
# `deep-z16-b16-e12-rp-klb-b09` over the 9 epochs that fit 47.6 minutes (the `vae` row's training
# time on the AMD EPYC) on the Intel Xeon at its slowest measured epoch there (287 s).
register_variant(
    "deep-z16-b16-e9-rp-klb-b09",
    "Deep HVAE (small, 32x32 latents, zdim 16), batch 16, cosine lr over 9 epochs, KL warm-up, KL "
    "balancing, residual posterior, AdamW beta2 0.9",
    "deep-z16-b16-e12-rp-klb-b09",
    {"epochs": 9},
)
# The same recipe over 10 epochs: they fit 47.6 minutes on the Intel Xeon at a step of 85 ms or
# less (its loop measured 77 ms at batch 16 on a fast day, 90-96 ms in the 9-epoch row's seed 0).
register_variant(
    "deep-z16-b16-e10-rp-klb-b09",
    "Deep HVAE (small, 32x32 latents, zdim 16), batch 16, cosine lr over 10 epochs, KL warm-up, KL "
    "balancing, residual posterior, AdamW beta2 0.9",
    "deep-z16-b16-e12-rp-klb-b09",
    {"epochs": 10},
)
# The same recipe over 11 epochs: they fit the `vae` row's training time on an AMD EPYC with AVX2
# only, where both steps train in float32 (bench_budget there: the `vae` row 76.4 minutes, this
# recipe's step 117.9 ms at batch 16, 11 epochs 67.6 minutes, 12 would take 0.97 of it).
register_variant(
    "deep-z16-b16-e11-rp-klb-b09",
    "Deep HVAE (small, 32x32 latents, zdim 16), batch 16, cosine lr over 11 epochs, KL warm-up, KL "
    "balancing, residual posterior, AdamW beta2 0.9",
    "deep-z16-b16-e12-rp-klb-b09",
    {"epochs": 11},
)
BITS_PER_DIM_TARGET = 4.0  # the deep rows' goal: test bits/dim of `small` within the VAE's training time
# Every deep row, in registration order.
DEEP_ROWS = tuple(name for name, row in ROWS.items() if row.config["model"] == "deep")
