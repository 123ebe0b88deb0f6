"""What both training applications (`pretrain`, `downstream`) share about a run.

Run folders and the `latest` link (`runs`), the MLflow store of a project (`tracking`), the
last/best checkpoint callbacks (`checkpoints`), progress reporting that works in a log file as
well as on a terminal (`progress`), the end-of-command summary (`summary`) and the LightningCLI
base that wires them together (`cli`). The applications import this package; it imports neither.
"""
