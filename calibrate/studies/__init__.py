"""Studies: what a job runs (probe, steering, null space, direction ablation), as plug-ins.

Importing the package registers the built-in studies; :func:`get_study` finds one by name.
"""

from calibrate.studies import ablation, baselines, probe, steering  # noqa: F401 - register them
from calibrate.studies.base import STUDIES, Study, StudyResult, get_study, register

__all__ = ["STUDIES", "Study", "StudyResult", "get_study", "register"]
