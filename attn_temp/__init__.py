"""Softmax temperature for transformers models, and measurement of what it does to representations.

`patch_model` puts softmax_T(z) = softmax(z / T) into a model's output head and attention layers;
`measure_representations` reports per-layer rank, logits norm, attention entropy and neural collapse.
"""

from .config import TemperatureConfig
from .patching import (
    UnsupportedModelError,
    get_temperatures,
    load_patched,
    patch_model,
    unpatch_model,
)

__version__ = "0.1.0"

__all__ = [
    "RepresentationReport",
    "TemperatureConfig",
    "UnsupportedModelError",
    "extract_features",
    "get_temperatures",
    "load_patched",
    "measure_representations",
    "patch_model",
    "unpatch_model",
]


def __getattr__(name):
    # The measurement stack pulls in matplotlib and scikit-learn; import it only when asked for.
    if name in ("measure_representations", "extract_features", "RepresentationReport"):
        from . import measure

        return getattr(measure, name)
    raise AttributeError(f"module 'attn_temp' has no attribute {name!r}")
