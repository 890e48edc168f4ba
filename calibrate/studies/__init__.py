"""Studies: what a job runs (probe, steering, null space, direction ablation), as plug-ins.

Importing the package registers the built-in studies; :func:`get_study` finds one by name.
"""

from calibrate.studies import ablation, probe, steering  # noqa: F401 - register the studies
from calibrate.studies.base import STUDIES, Study, StudyResult, get_study, register

__all__ = ["STUDIES", "Study", "StudyResult", "get_study", "register"]
