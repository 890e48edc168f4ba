"""The gradient-fitted direction against one probe of its calibration rows, side by side (not a test).

``calibrate bench gradient [--model smollm2] [--dataset sst2] [--n 436] [--rounds 3]``

On the same ``--n`` prompts (SST-2's calibration split is 436 of its 872 sentences), interleaved
round by round (only ratios measured together count on these noisy machines), it times:

* ``probe``: one layer-wise probe of the prompts (every layer through the lens);
* ``gradient_last``: ``direction.method=gradient`` at the last layer with the default
  ``direction.gradient`` settings, given the probe's cached last-layer residuals (what a job
  has at that point): final norm and option rows only, no forward pass;
* ``gradient_block4``: the same at the input of the fourth-last block (layer L - 4): one
  no-gradient prefix pass of the prompts, then every step runs the last four blocks for the last
  position on the detached key/value cache.

It prints the ratios and merges ``gradient_last_over_probe`` (target <= 2),
``gradient_block4_over_probe`` (target <= 10), the seconds and the steps each fit ran into
``bench.json`` in the current directory.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrate.bench.rounds import median_seconds
from calibrate.io.results import merge_json

BENCH_FILE = "bench.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="calibrate bench gradient", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model config name")
    parser.add_argument("--dataset", default="sst2", help="dataset config name")
    parser.add_argument("--n", type=int, default=436, help="calibration prompts (SST-2: 436)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", default=BENCH_FILE)
    return parser.parse_args(argv)


def setup(model: str, dataset: str, n: int):
    """Model, prompts (the first n after a seeded shuffle) and the probe settings."""
    from calibrate.bench.probe_bench import load_inputs

    loaded, prompt_set, settings, cfg = load_inputs(model, dataset, n)
    return loaded, prompt_set, settings, cfg.direction.gradient


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:

    from calibrate.directions.gradient import fit_gradient
    from calibrate.engine.scoring import score

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded, prompt_set, settings, gcfg = setup(args.model, args.dataset, args.n)
    last = loaded.adapter.num_blocks
    gsettings = gcfg
    keep = settings.keeping((last,))
    cal = np.arange(len(prompt_set.prompts))
    base = score(loaded, prompt_set, keep)  # warm-up, and the residuals a job has cached
    residual, scores = base.residuals[last], base.option_logits[:, -1]
    steps: dict[str, int] = {}

    def fit(layer: int, name: str):
        def run():
            out = fit_gradient(loaded, prompt_set, cal, layer,
                               residual if layer == last else None, gsettings, 0, scores)
            steps[name] = int(out.curve["step"].max())
        return run

    variants = {"probe": lambda: score(loaded, prompt_set, keep),
                "gradient_last": fit(last, "gradient_last"),
                "gradient_block4": fit(last - 4, "gradient_block4")}
    print(f"bench: gradient fit vs probe, {args.model} on {args.n} {args.dataset} prompts, "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads")
    med = median_seconds(variants, args.rounds, 16)
    figures = {
        "gradient_last_over_probe": med["gradient_last"] / med["probe"],
        "gradient_block4_over_probe": med["gradient_block4"] / med["probe"],
        **{f"{k}_s": v for k, v in med.items()},
        "gradient_last_steps": steps.get("gradient_last"),
        "gradient_block4_steps": steps.get("gradient_block4"),
        "gradient_bench": {"model": args.model, "dataset": args.dataset, "n": args.n,
                           "rounds": args.rounds, "threads": torch.get_num_threads(),
                           "settings": gcfg},
    }
    print(f"gradient_last_over_probe   {figures['gradient_last_over_probe']:.3f}  (target <= 2)")
    print(f"gradient_block4_over_probe {figures['gradient_block4_over_probe']:.3f}  (target <= 10)")
    merge_json(Path(args.out), figures)
    return figures


if __name__ == "__main__":
    main()
