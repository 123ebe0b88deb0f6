"""Pretraining objectives, each an nn.Module: forward(batch, encoded) -> (loss, metrics).

`encoded` maps each batch key the objective lists in `views` to the shared encoder's
`EncoderOutput` for it (see `pretrain.objectives.base.Objective`).
"""

from pretrain.objectives.base import Objective
from pretrain.objectives.clip import ClipObjective
from pretrain.objectives.dino import DINOObjective
from pretrain.objectives.mae import MAEObjective
from pretrain.objectives.phenotype import PhenotypeObjective
from pretrain.objectives.tte import TimeToEventObjective
from pretrain.objectives.voco import VoCoObjective

__all__ = [
    "ClipObjective",
    "DINOObjective",
    "MAEObjective",
    "Objective",
    "PhenotypeObjective",
    "TimeToEventObjective",
    "VoCoObjective",
]
