"""Convolutional building blocks shared by the VAE and the HVAE (32x32 images)."""

from torch import nn


def conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (stride 1) or 4x4 conv (stride 2, halves the size), BatchNorm, SiLU."""
    k, p = (4, 1) if stride == 2 else (3, 1)
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, p, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


def up_block(c_in: int, c_out: int) -> nn.Sequential:
    """4x4 transposed conv doubling the size, BatchNorm, SiLU."""
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU()
    )


def encoder_trunk(channels: int, levels: int) -> nn.Sequential:
    """3 x 32 x 32 -> (channels * 2^levels) x (32 / 2^levels)^2."""
    layers = [conv_block(3, channels)]
    c = channels
    for _ in range(levels):
        layers.append(conv_block(c, 2 * c, stride=2))
        c *= 2
    return nn.Sequential(*layers)


def decoder_trunk(c_in: int, channels: int, levels: int, c_out: int) -> nn.Sequential:
    """(channels * 2^levels) x s^2 -> c_out x (s * 2^levels)^2, ``c_in`` input channels."""
    c = channels * 2**levels
    layers = [conv_block(c_in, c)]
    for _ in range(levels):
        layers.append(up_block(c, c // 2))
        c //= 2
    layers.append(nn.Conv2d(c, c_out, 3, 1, 1))
    return nn.Sequential(*layers)


class GaussianHead(nn.Module):
    """A layer whose output splits into (mu, logvar) along dim 1."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, h):
        mu, logvar = self.layer(h).chunk(2, dim=1)
        return mu, logvar
