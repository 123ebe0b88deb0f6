"""fm3d: 3D CT foundation encoders pretrained with EHR supervision.

The public face is what `__all__` lists; everything else may change between releases.
"""

from fm3d.data.io import read_volume
from fm3d.encoder_input import preprocessing
from fm3d.io import load_encoder, save_encoder
from fm3d.models.encoder import EncoderOutput
from fm3d.models.registry import create_encoder, list_encoders
from fm3d.spec import InputSpec

__version__ = "0.1.0"

__all__ = [
    "EncoderOutput",
    "InputSpec",
    "__version__",
    "create_encoder",
    "list_encoders",
    "load_encoder",
    "preprocessing",
    "read_volume",
    "save_encoder",
]
