"""fasthvae: fast VAE and hierarchical VAE training with fused Gaussian kernels."""

__version__ = "0.1.0"
