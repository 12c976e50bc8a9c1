"""fasthvae's version: the package metadata (``pyproject.toml``) and every record that names the
code that wrote it (checkpoints, the speed cache, ``fasthvae env``) read it from here."""

__version__ = "0.1.0"
