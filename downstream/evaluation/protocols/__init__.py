"""Evaluation protocols, one module each (see `downstream.evaluation.protocol.register_protocol`)."""
