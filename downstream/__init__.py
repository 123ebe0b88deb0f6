"""Downstream application: the task registry, fine-tune strategies, tasks and their CLI."""
