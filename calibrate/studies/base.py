"""Studies as plug-ins: ``Study.run(ctx) -> StudyResult``, registered by name.

A study receives the :class:`~calibrate.studies.context.JobContext` and returns a typed result
that knows its own files, plots and tracker entries; the job (:mod:`calibrate.job`) writes,
plots and logs any result the same way. A new study is one module::

    @register
    class Baselines(Study):
        name = "baselines"

        def run(self, ctx):
            ...
            return BaselinesResult(report=..., summary={...})
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from calibrate.io.track import Tracker
    from calibrate.studies.context import JobContext, ProbeReport


@dataclass
class StudyResult:
    """What a study produced. ``report`` is the per-layer reference table the job writes as
    layers.csv (for studies on a split: the unsteered evaluation split); ``summary`` goes into
    metrics.json. Subclasses add their own files, plots and tracker entries."""

    report: ProbeReport
    summary: dict[str, Any] = field(default_factory=dict)
    files: ClassVar[tuple[str, ...]] = ()  # what :meth:`write` and :meth:`plot` may create

    def write(self, job_dir: Path) -> None:
        """Write the study's own files (besides layers.csv, predictions.npz, metrics.json)."""

    def plot(self, job_dir: Path, title: str) -> dict[str, Path]:
        """Draw the study's own figures; returns them by name."""
        return {}

    def log(self, tracker: Tracker, job_dir: Path) -> None:
        """Log the study's own tables, series and artifacts (files are in ``job_dir``)."""


class Study(ABC):
    """A kind of job: what runs between a loaded model with its prompts and the files."""

    name: ClassVar[str]

    @classmethod
    def settings(cls, config: Mapping[str, Any]) -> Any:
        """The study's own typed settings from the resolved config (checked when the spec is
        built, before anything loads); None when it has none."""
        return None

    @abstractmethod
    def run(self, ctx: JobContext) -> StudyResult:
        """Run on the context's model and prompts; no files are written here."""


STUDIES: dict[str, type[Study]] = {}


def register(cls: type[Study]) -> type[Study]:
    """Class decorator: make a study available under its ``name``."""
    if cls.name in STUDIES and STUDIES[cls.name] is not cls:
        raise ValueError(f"a study named {cls.name!r} is registered already")
    STUDIES[cls.name] = cls
    return cls


def get_study(name: str) -> Study:
    """A registered study by name; an error lists the registered ones."""
    import calibrate.studies  # noqa: F401 - registers the built-in studies

    if name not in STUDIES:
        raise KeyError(f"study {name!r}; accepted: {', '.join(sorted(STUDIES))}")
    return STUDIES[name]()


