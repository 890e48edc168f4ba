"""calibrate: layer-wise calibration probing and steering of language models."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["compose", "fit_direction", "load_dataset", "load_model", "null_space", "probe_layers",
           "run_study", "split_records", "steer", "typed_config", "use_model"]


def __getattr__(name: str):
    # Lazy: importing calibrate must not import torch or transformers.
    if name in __all__:
        from calibrate import api

        return getattr(api, name)
    raise AttributeError(f"module 'calibrate' has no attribute {name!r}")
