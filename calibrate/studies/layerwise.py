"""``intervention=probe``: the plain layer-wise probe, every example, every layer, no edit.

Under a lens fit on the job's prompts (``lens=tuned``/``affine`` without ``lens.text_path`` or
``lens.path``, ``lens=probe``) the lens is fit on the calibration half of the job's seeded split
(``direction.calibration_fraction``, ``direction.seed``, as every other study) and the probe
reports the evaluation half only: no lens ever reads a row it was fit on.
"""

from __future__ import annotations

from calibrate.studies.job_context import JobContext
from calibrate.studies.study import Study, StudyResult, register


@register
class ProbeStudy(Study):
    """Accuracy, ECE, MCE … per layer on all of the job's examples (no split, no edit)."""

    name = "probe"
    description = "every layer read on every example"
    reads = ("direction.calibration_fraction", "direction.seed")  # with a lens fit on the prompts

    def run(self, ctx: JobContext) -> StudyResult:
        result = ctx.probe()
        if not ctx.spec.uses_split:
            return StudyResult(ctx.report(result))
        cal, evaluation = ctx.split()
        return StudyResult(ctx.report(result.take(evaluation), ctx.prompt_set.subset(evaluation)),
                           {"n_calibration": int(len(cal)), "n_evaluation": int(len(evaluation)),
                            "evaluated": "evaluation split (the lens is fit on the calibration "
                                         "split)"})
