"""NaN forensics: the skipped step's culprit (term, group, parameter), skips.jsonl, likely causes."""

import json

import pytest
import torch

from fasthvae import train
from fasthvae.models import build_model
from fasthvae.training import forensics
from tests.helpers import SMALL


@pytest.fixture
def model_and_terms():
    torch.manual_seed(0)
    model = build_model("hvae", channels=8, latent=16, z1_channels=4)
    x = torch.rand(4, 3, 32, 32)
    return model, x


def skipped_step(model, x, spoil_term=None, spoil_param=None):
    """The forensics record of one step whose term or parameter gradient was made non-finite."""
    terms = model.loss(x, [1.0, 1.0])
    if spoil_term is not None:
        terms[spoil_term] = terms[spoil_term] * float("nan")
        terms["loss"] = terms["recon"] + terms["kl_z1"] + terms["kl_z2"]
    model.zero_grad()
    if spoil_param is not None:
        dict(model.named_parameters())[spoil_param].register_hook(lambda g: g * float("inf"))
    terms["loss"].backward()
    return forensics.diagnose(*host_values(model, terms), None, None)


def host_values(model, terms):
    """(terms, blame order, per-parameter gradient norms, total norm) as the trainer reads them back."""
    norms = {n: float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None}
    total = float(torch.tensor(list(norms.values())).norm())
    values = {k: float(v) for k, v in terms.items()}
    return values, ["recon", "kl_z2", "kl_z1"], norms, total


@pytest.mark.parametrize("term", ["recon", "kl_z1", "kl_z2"])
def test_names_the_first_non_finite_term(model_and_terms, term):
    record = skipped_step(*model_and_terms, spoil_term=term)
    assert record["reason"] == "non-finite" and record["term"] == term
    assert record["non_finite_terms"] == [term]
    assert record["parameter"] is not None, "a NaN loss spoils some gradient too"
    cause = forensics.likely_cause([record] * 3)
    assert term in cause or ("reconstruction" in cause and term == "recon")


def test_names_the_parameter_whose_gradient_overflowed(model_and_terms):
    model, x = model_and_terms
    name = [n for n, _ in model.named_parameters()][5]
    record = skipped_step(model, x, spoil_param=name)
    assert record["reason"] == "non-finite" and record["term"] is None and record["parameter"] == name
    assert f"the gradient of {name} went non-finite while the loss was finite" in forensics.likely_cause(
        [record]
    )


def test_a_threshold_skip_names_the_largest_gradient(model_and_terms):
    model, x = model_and_terms
    terms = model.loss(x, [1.0, 1.0])
    terms["loss"].backward()
    largest = max(model.named_parameters(), key=lambda item: float(item[1].grad.norm()))[0]
    values, order, norms, _ = host_values(model, terms)
    record = forensics.diagnose(values, order, norms, 5e3, 40.0, None)
    assert record["reason"] == "above threshold" and record["term"] is None
    assert record["parameter"] == largest
    assert "exceeding the adaptive threshold" in forensics.likely_cause([record])


def test_the_log_and_its_epoch_summary(tmp_path):
    log = forensics.SkipLog(tmp_path / "skips.jsonl")
    for term in ("kl_z1", "kl_z1", None):
        log.add({"term": term, "reason": "non-finite", "step": 1})
    assert log.end_epoch() == "3 skipped step(s) (2 kl_z1, 1 gradient; see skips.jsonl)"
    assert log.end_epoch() is None
    assert len((tmp_path / "skips.jsonl").read_text().splitlines()) == 3


def test_a_run_that_diverges_in_one_kl_group_says_so(data, tmp_path, monkeypatch, capsys):
    real = train.Objective.forward

    def kl_z2_blows_up(self, x, weights, balance=None):
        terms = real(self, x, weights, balance)
        terms["kl_z2"] = terms["kl_z2"] * float("inf")
        terms["loss"] = terms["loss"] + terms["kl_z2"]
        return terms

    monkeypatch.setattr(train.Objective, "forward", kl_z2_blows_up)
    argv = ["--data", data, "--out", str(tmp_path), *SMALL, "--epochs", "1", "--limit-train", "128"]
    assert train.main([*argv, "--max-skips", "2", "--no-compile", "--no-tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "Likely cause: kl_z2 went non-finite first (2 of the last 2 skips)" in err
    records = [json.loads(line) for line in (tmp_path / "skips.jsonl").read_text().splitlines()]
    assert [r["term"] for r in records] == ["kl_z2", "kl_z2"]
    assert [r["step"] for r in records] == [1, 2] and records[0]["loss_scale"] is None
