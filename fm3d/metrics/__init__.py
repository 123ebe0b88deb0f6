"""Evaluation metrics shared by pretraining and downstream tasks (survival metrics live in `ehr`)."""
