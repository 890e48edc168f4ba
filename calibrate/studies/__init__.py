"""Studies: what a job runs, one plug-in per module, chosen with ``intervention=<name>``.

Every module of this package is imported with it, so a study registers itself by being here
(:func:`~calibrate.studies.study.register`). Built in: ``probe`` (:mod:`.layerwise`), ``steering``
(:mod:`.steering`), ``nullspace`` and ``direction_ablate`` (:mod:`.subspace_ablation`),
``baselines`` (:mod:`.baselines`), ``neurons`` (:mod:`.neurons`).
"""

import importlib
import pkgutil

from calibrate.studies.study import STUDIES, Study, StudyResult, get_study, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["STUDIES", "Study", "StudyResult", "get_study", "register"]
