"""``intervention=probe``: the plain layer-wise probe, every example, every layer, no edit."""

from __future__ import annotations

from calibrate.studies.job_context import JobContext
from calibrate.studies.study import Study, StudyResult, register


@register
class ProbeStudy(Study):
    """Accuracy, ECE, MCE … per layer on all of the job's examples (no split, no edit)."""

    name = "probe"
    description = "every layer read on every example"

    def run(self, ctx: JobContext) -> StudyResult:
        return StudyResult(ctx.report(ctx.probe()))
