"""The study as a command: rows (model + schedule) trained under one protocol, its table and claims."""

from fasthvae.study.rows import ROWS, Row, register_row, register_variant

__all__ = ["ROWS", "Row", "register_row", "register_variant"]
