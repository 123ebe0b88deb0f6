"""Pretraining application: objectives, the PretrainModule and its LightningCLI."""
