"""Downstream tasks, one module each, registered with `downstream.registry.register_task`."""
