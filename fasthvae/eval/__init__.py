"""Evaluation: test-set reconstruction, KLs, ELBO / importance-weighted bounds, bits/dim and FID."""
