"""Studies as plug-ins: ``Study.run(ctx) -> StudyResult``, registered by name.

A study owns its seam: its name is the ``intervention=`` option that runs it (registered in
Hydra's ConfigStore by :func:`register`), it says which settings it reads (:attr:`Study.reads`;
the others are reported unused), it checks what needs the model's shape, and its result knows
its own files, plots, tracker entries, summary rows and headline. The job
(:mod:`calibrate.job`), the sweep summary (:mod:`calibrate.io.summary`) and the config name no
study. A new study is one module of :mod:`calibrate.studies`::

    @register
    class MyStudy(Study):
        name = "my_study"
        reads = ("intervention.layers",)

        def run(self, ctx):
            ...
            return MyResult(report=..., summary={...})
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from hydra.core.config_store import ConfigStore

from calibrate.engine.edits import InterventionSettings

if TYPE_CHECKING:  # pragma: no cover
    from calibrate.io.track import Tracker
    from calibrate.studies.job_context import JobContext, ProbeReport

# Settings every study reads: the rest are listed by each study (Study.reads).
COMMON = ("model", "dataset", "prompt", "probe", "metrics", "phases", "checks", "output",
          "tracker", "lens", "seed", "resume", "cache_dir", "intervention.name")


@dataclass
class StudyResult:
    """What a study produced. ``report`` is the per-layer reference table the job writes as
    layers.csv (for studies on a split: the unsteered evaluation split); ``summary`` goes into
    metrics.json. Subclasses add their own files, plots, tracker entries and summary rows."""

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

    def tracker_summary(self) -> dict[str, Any]:
        """The study's own run-summary values (flat keys, the same in every run of the study)."""
        return {}

    def summary_rows(self) -> list[dict[str, Any]]:
        """The study's rows of a sweep's summary.csv (metrics.json carries them as
        ``summary_rows``): one row, or one per arm (e.g. per η); [] for the job's plain row."""
        return []

    def sweep_tables(self) -> dict[str, list[dict[str, Any]]]:
        """Extra tables of a sweep (``<name>.csv`` in its folder): rows this job adds to each."""
        return {}

    def headline(self) -> list[str]:
        """Lines the console prints after the job's headline (e.g. the steered values)."""
        return []


class Study(ABC):
    """A kind of job: what runs between a loaded model with its prompts and the files.

    A study with settings of its own gives them as ``Settings``, a dataclass subclassing
    :class:`~calibrate.engine.edits.InterventionSettings` (checked in its ``__post_init__``):
    ``intervention=<name>`` then composes that node, so its keys are ``intervention.<key>``, as a
    readout's are ``lens.<key>``, and nothing outside the study's module names them.
    """

    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ()  # setting prefixes read beyond COMMON
    description: ClassVar[str] = ""
    Settings: ClassVar[type[InterventionSettings]] = InterventionSettings

    def check_shape(self, spec: Any, num_blocks: int, hidden_size: int) -> None:
        """Checks of the settings the study reads that need the model's shape (no weights)."""

    @abstractmethod
    def run(self, ctx: JobContext) -> StudyResult:
        """Run on the context's model and prompts; no files are written here."""


def unused_settings(study: Study, keys: Sequence[str]) -> list[str]:
    """The dotted settings of ``keys`` (e.g. a command line's) that ``study`` does not read."""
    read = (*COMMON, *study.reads)
    return [key for key in keys
            if "." in key or key in ("eta",)
            if not key.startswith("hydra.")
            and not any(key == p or key.startswith(p + ".") or p.startswith(key + ".")
                        for p in read)]


STUDIES: dict[str, type[Study]] = {}


def register(cls: type[Study]) -> type[Study]:
    """Class decorator: make a study available as ``intervention=<name>``."""
    if cls.name in STUDIES and STUDIES[cls.name] is not cls:
        raise ValueError(f"a study named {cls.name!r} is registered already")
    STUDIES[cls.name] = cls
    if not issubclass(cls.Settings, InterventionSettings):
        raise TypeError(f"study {cls.name!r}: Settings must subclass InterventionSettings")
    ConfigStore.instance().store(group="intervention", name=cls.name,
                                 node=cls.Settings(name=cls.name))
    return cls


def get_study(name: str) -> Study:
    """A registered study by name; an error lists the registered ones."""
    if name not in STUDIES:
        raise KeyError(f"study {name!r}; accepted: {', '.join(sorted(STUDIES))}")
    return STUDIES[name]()
