"""Names of the FID feature extractors: the trainer's options offer them, evaluation builds them."""

INCEPTION = "inception-v3-compat"  # torch-fidelity's Inception, the standard FID features
TINY = "fasthvae-tiny"  # a tiny fixed extractor for tests: its numbers are not comparable
EXTRACTORS = (INCEPTION, TINY)
