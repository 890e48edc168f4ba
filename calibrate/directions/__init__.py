"""Calibration directions: one strategy per method, their settings, their files.

Every module of this package is imported with it, so a method registers itself by being here
(:func:`~calibrate.directions.direction_method.register_method`); nothing else names it. The built-in
methods: ``layer_diff`` (the paper's) and ``mean_diff`` (:mod:`.differences`), ``random``
(:mod:`.random_control`), ``pca`` (:mod:`.pca`), ``probe`` (:mod:`.correctness_probe`),
``gradient`` (:mod:`.gradient`). Files: :mod:`.files` (safetensors + json), :mod:`.gguf` (repeng
control vectors), :mod:`.lmeval` (lm-eval's ``steered`` model); :mod:`.fit` obtains ĉ for a job.
"""

import importlib
import pkgutil

from calibrate.directions.direction_method import (
    METHODS,
    DirectionMethod,
    FitRequest,
    get_method,
    register_method,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from calibrate.directions.settings import DirectionSettings, settings_class  # noqa: E402

__all__ = ["METHODS", "DirectionMethod", "DirectionSettings", "FitRequest", "get_method",
           "register_method", "settings_class"]
