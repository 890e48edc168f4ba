"""The plain layer-wise probe: every example, every layer through the logit lens."""

from __future__ import annotations

from calibrate.studies.base import Study, StudyResult, register
from calibrate.studies.context import JobContext


@register
class ProbeStudy(Study):
    """Accuracy, ECE, MCE … per layer on all of the job's examples (no split, no edit)."""

    name = "probe"

    def run(self, ctx: JobContext) -> StudyResult:
        return StudyResult(ctx.report(ctx.probe()))
