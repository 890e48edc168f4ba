"""Readouts: how every layer is read (the ``lens`` config group), one strategy per module.

Every module of this package is imported with it, so a readout registers itself by being here
(:func:`~calibrate.readouts.readout_kind.register_readout`). Built in: ``logit`` (:mod:`.logit`),
``tuned`` (:mod:`.tuned_lens`), ``affine`` (:mod:`.affine_lens`) and ``probe``
(:mod:`.option_probe`); :mod:`.translators` (the translated lens and the tuned-lens file format),
:mod:`.lens_text` (training text, residuals, KL) and :mod:`.lens_cache` serve them.
"""

import importlib
import pkgutil

from calibrate.readouts.readout_kind import (
    READOUTS,
    ReadoutKind,
    ReadoutSource,
    build_readout,
    kind_of,
    register_readout,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["READOUTS", "ReadoutKind", "ReadoutSource", "build_readout", "kind_of",
           "register_readout"]
