"""Pretraining objectives, each an nn.Module: forward(batch, encoder_output) -> (loss, metrics)."""
