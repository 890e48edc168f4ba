"""``calibrate export``: a steering job's direction for other tools (``python -m calibrate`` too).

    calibrate export lmeval <job dir> --eta 8 [--out steer.pt] [--force]
    calibrate export repeng <job dir> [--out direction.gguf]

Only a finished steering job is exported, and only its own direction (direction files that
carry its metrics.json ``config_hash``); ``--eta`` must be finite and one of the η it ran
(``--force`` exports another, with a warning, recorded in the file).

``lmeval`` writes the steering file of lm-evaluation-harness's ``steered`` model
(:mod:`calibrate.directions.lmeval`):
``lm_eval --model steered --model_args pretrained=<model>,steer_path=<file>``. ``repeng`` writes
ĉ as a repeng control-vector GGUF at each intervention layer (:mod:`calibrate.directions.gguf`),
which ``direction.path`` reads back.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="calibrate export",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="target", required=True)
    lm = sub.add_parser("lmeval", help="steering file of lm-eval's `steered` model (.pt)")
    lm.add_argument("job_dir")
    lm.add_argument("--eta", type=float, required=True,
                    help="steering strength (the job's units): one of the η the job ran")
    lm.add_argument("--out", default=None, help="output .pt (default: <job dir>/lmeval_steer_eta<eta>.pt)")
    lm.add_argument("--force", action="store_true",
                    help="export a position=last job, or an η the job did not run, anyway "
                         "(warned about and recorded in the file)")
    rp = sub.add_parser("repeng", help="repeng control-vector GGUF")
    rp.add_argument("job_dir")
    rp.add_argument("--out", default=None, help="output .gguf (default: <job dir>/direction.gguf)")
    return parser.parse_args(argv)


def export_repeng(job_dir: str | Path, out: str | Path | None = None) -> Path:
    """ĉ (unit) at each intervention layer of a finished steering job (checked as for lm-eval:
    :func:`~calibrate.directions.lmeval.read_steering_job`), as a repeng control vector."""
    from calibrate.directions.gguf import write_control_vector
    from calibrate.directions.lmeval import read_steering_job

    job_dir = Path(job_dir)
    metrics, meta, direction = read_steering_job(job_dir)
    layers = meta.get("intervention_layers") or metrics.get("intervention_layers") or []
    return write_control_vector(Path(out) if out else job_dir / "direction.gguf",
                                metrics.get("model_type", ""),
                                {int(layer): direction.vector for layer in layers})


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input, one line on stderr)."""
    from calibrate.core.direction import DirectionError
    from calibrate.directions.gguf import ControlVectorError
    from calibrate.directions.lmeval import ExportError, ForcedExport, export_job
    from calibrate.io.results import OutputError

    args = parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ForcedExport)
            if args.target == "lmeval":
                path = export_job(args.job_dir, args.eta, args.out, args.force)
            else:
                path = export_repeng(args.job_dir, args.out)
    except (ExportError, DirectionError, ControlVectorError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in caught:
        if issubclass(warning.category, ForcedExport):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)
    if args.target == "lmeval":
        from calibrate.directions.lmeval import lmeval_command

        print(f"[calibrate] evaluate it with (the model from this machine's folder; lm-eval "
              f"loads its task data from the hub unless cached):\n  "
              f"{lmeval_command(args.job_dir, path)}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
