"""Encoder families, attention backends and the encoder registry."""
