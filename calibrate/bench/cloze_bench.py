"""Speed of cloze scoring through the lens, side by side with lm-eval's scoring (not a test).

``calibrate bench cloze [--model smollm2] [--dataset arc_easy] [--n 16] [--rounds 3]``

On records of a cloze dataset (ARC-Easy by default: lm-eval's ARC prompt
``Question: {question}\\nAnswer:``, continuation ``" " + option``; ``--dataset hellaswag`` for long
continuations), its prompts built as a job builds them, it times, interleaved round by round
(only ratios measured together count):

* ``cloze``: :func:`calibrate.engine.cloze.run_cloze`, every layer through the lens, the context run
  once per example (key/value cache) and each lens state read once;
* ``lmeval``: lm-eval's own scoring (``HFLM._loglikelihood_tokens``): every context + continuation
  (without its last token) from scratch through ``model(...)``, longest first, right-padded
  batches, identical inputs run once, full log-softmax, gather; the last layer only;
* ``steer8`` / ``steer8_before_last`` / ``steer8_full``: 8 etas of steering at the last context
  position, at the last layer / at the block before last (one context pass, each eta above the
  edit only: :mod:`calibrate.engine.cloze_steer`) / a full cloze pass per eta;
* ``scratch``: every layer through the lens without sharing anything: each option's context +
  continuation from scratch (the options of one example as one batch), the full-vocabulary lens at
  every continuation position of every layer.

It runs on one CPU thread unless ``--threads`` says otherwise, checks that the three agree
(cloze's last layer against lm-eval, every layer against scratch), prints ``cloze_over_lmeval``
(target <= 1.2), ``cloze_steer8_over_cloze`` (target <= 2) and ``cloze_over_from_scratch`` and merges them into ``bench.json`` in the
current directory. lm-eval's own float32 log-softmax is off the float64 score by up to ~2e-4 on
SmolLM2; cloze's float32 lens with a float64 normalizer is closer (tests/references.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrate.engine.cloze import (
    capture_positions,
    cloze_readout,
    lens_logprobs,
    run_cloze,
    run_cloze_steered,
)
from calibrate.engine.cloze_plan import token_plan
from calibrate.engine.edits import Steering
from calibrate.engine.probe import ProbeSettings, left_pad, position_ids
from calibrate.io.results import merge_json
from calibrate.model.load import LoadedModel
from calibrate.tasks.continuations import ClozeRequest
from calibrate.tasks.data import load_records
from calibrate.tasks.prompts import build_prompts

BENCH_FILE = "bench.json"


def lmeval_loglik(loaded: LoadedModel, requests: Sequence[ClozeRequest],
                  batch_size: int) -> list[np.ndarray]:
    """lm-eval's scores: [K] summed continuation log-probabilities per example (last layer)."""
    inputs: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
    for i, req in enumerate(requests):
        for k, cont in enumerate(req.continuations):
            inputs.setdefault(tuple((req.context_ids + cont)[:-1]), []).append((i, k, cont))
    order = sorted(inputs, key=lambda seq: (-len(seq), seq))  # lm-eval's Collator: longest first
    out = [np.zeros(r.n_options) for r in requests]
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            ids = torch.zeros((len(chunk), len(chunk[0])), dtype=torch.long)  # right-padded
            for row, seq in enumerate(chunk):
                ids[row, :len(seq)] = torch.tensor(seq)
            logits = loaded.model(input_ids=ids.to(loaded.device)).logits  # no mask, as lm-eval
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, seq in enumerate(chunk):
                for i, k, cont in inputs[seq]:
                    part = logprobs[row, len(seq) - len(cont):len(seq)]
                    target = torch.tensor(cont, device=part.device)[:, None]
                    out[i][k] = float(part.gather(1, target).double().sum())
    return out


def scratch_lens_loglik(loaded: LoadedModel, requests: Sequence[ClozeRequest]) -> list[np.ndarray]:
    """Every layer, nothing shared: [L+1, K] per example, each option run from scratch."""
    (lens, max_rows), device = cloze_readout(loaded.adapter), loaded.device
    pad = loaded.tokenizer.pad_token_id
    out = []
    with torch.inference_mode():
        for req in requests:
            ids, mask = left_pad([(req.context_ids + c)[:-1] for c in req.continuations], pad)
            with capture_positions(loaded.adapter, slice(None)) as store:
                loaded.adapter.backbone(input_ids=ids.to(device), attention_mask=mask.to(device),
                                        position_ids=position_ids(mask).to(device), use_cache=False)
            hidden = torch.stack([t.to(lens.device) for t in store], dim=2)  # [K, T, L+1, H]
            width = hidden.shape[1]  # left-padded: the last len(c) positions predict option c
            states = torch.cat([hidden[k, width - len(c):]
                                for k, c in enumerate(req.continuations)])
            targets = torch.tensor([t for c in req.continuations for t in c])
            logprobs = lens_logprobs(lens, states, torch.arange(len(targets)), targets, max_rows)
            rows = torch.repeat_interleave(torch.arange(req.n_options),
                                           torch.tensor([len(c) for c in req.continuations]))
            loglik = torch.zeros(req.n_options, logprobs.shape[1], dtype=torch.float64)
            out.append(loglik.index_add_(0, rows, logprobs.cpu()).T.numpy())
    return out


def _time(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def agreement(cloze: np.ndarray, lmeval: list[np.ndarray],
              scratch: list[np.ndarray]) -> dict[str, float]:
    """Largest absolute gaps: cloze's last layer vs lm-eval, cloze's every layer vs scratch."""
    last = max(float(np.abs(cloze[i, -1, :len(s)] - s).max()) for i, s in enumerate(lmeval))
    every = max(float(np.abs(cloze[i, :, :s.shape[1]] - s).max()) for i, s in enumerate(scratch))
    return {"cloze_vs_lmeval_max_abs": last, "cloze_vs_scratch_max_abs": every}


def matmul_ratio(requests: Sequence[ClozeRequest], body: int, vocab: int, hidden: int,
                 layers: int) -> dict[str, float]:
    """What the arithmetic alone implies: multiply-adds of cloze over lm-eval's, counting the
    blocks' ``body`` weights once per token run and the [vocab, hidden] unembedding once per
    (state, layer) the lens reads (cloze) or once per token (lm-eval); attention scores are
    left out.

    Cloze runs each context once and each continuation without its last token, and reads
    ``layers`` layers through the full vocabulary at every distinct predicting state; lm-eval
    runs context + continuation (without its last token) per option, the head once per token.
    """
    tokens_cloze = sum(len(r.context_ids) + sum(len(c) - 1 for c in r.continuations)
                       for r in requests)
    states = sum(len(token_plan(r.continuations, [0] * r.n_options, [1] * r.n_options).state_src)
                 for r in requests)
    tokens_lmeval = sum(len(r.context_ids) + len(c) - 1 for r in requests for c in r.continuations)
    lens = states * layers * vocab * hidden
    cloze = tokens_cloze * body + lens
    return {"cloze_over_lmeval_matmul": cloze / (tokens_lmeval * (body + vocab * hidden)),
            "cloze_lens_share_matmul": lens / cloze}


def model_shape(loaded: LoadedModel) -> dict[str, int]:
    """The sizes :func:`matmul_ratio` needs, read off a loaded model."""
    vocab, hidden = loaded.adapter.unembed_weight.shape
    body = sum(p.numel() for block in loaded.adapter.blocks for p in block.parameters())
    return {"body": body, "vocab": vocab, "hidden": hidden, "layers": loaded.adapter.num_blocks + 1}


def eight_etas(loaded: LoadedModel, layer: int) -> Steering:
    """A seeded unit direction at 8 etas, at the last context position of ``layer``."""
    vec = np.random.default_rng(0).standard_normal(loaded.adapter.unembed_weight.shape[1])
    return Steering(vec / np.linalg.norm(vec), (layer,), tuple(float(e) for e in range(8)), "last")


def measure(loaded: LoadedModel, requests: Sequence[ClozeRequest], labels: np.ndarray,
            settings: ProbeSettings, rounds: int, lmeval_batch: int) -> dict[str, Any]:
    """Interleave the three variants ``rounds`` times; medians of the times."""
    last = loaded.adapter.num_blocks
    variants: dict[str, Callable[[], Any]] = {
        "cloze": lambda: run_cloze(loaded, requests, labels, settings).option_logits,
        "lmeval": lambda: lmeval_loglik(loaded, requests, lmeval_batch),
        "scratch": lambda: scratch_lens_loglik(loaded, requests),
        "steer8": lambda: run_cloze_steered(loaded, requests, eight_etas(loaded, last), settings),
        "steer8_before_last": lambda: run_cloze_steered(loaded, requests,
                                                        eight_etas(loaded, last - 1), settings),
        "steer8_full": lambda: run_cloze_steered(loaded, requests, eight_etas(loaded, last),
                                                 settings, use_cache=False),
    }
    few = requests[:2]  # warm-up (allocator, kernels) on two records
    run_cloze(loaded, few, labels[:2], settings)
    lmeval_loglik(loaded, few, lmeval_batch)
    scratch_lens_loglik(loaded, few)
    times: dict[str, list[float]] = {k: [] for k in variants}
    outputs: dict[str, Any] = {}
    for round_ in range(rounds):
        for name, fn in variants.items():
            elapsed, outputs[name] = _time(fn, loaded.device)
            times[name].append(elapsed)
            print(f"  round {round_ + 1}/{rounds} {name:8s} {elapsed:8.2f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    n_tokens = [len(c) for r in requests for c in r.continuations]
    return {
        "cloze_steer8_over_cloze": med["steer8"] / med["cloze"],
        "cloze_steer8_before_last_over_cloze": med["steer8_before_last"] / med["cloze"],
        "cloze_steer8_full_over_cloze": med["steer8_full"] / med["cloze"],
        "cloze_over_lmeval": med["cloze"] / med["lmeval"],
        "cloze_over_from_scratch": med["cloze"] / med["scratch"],
        "cloze_s": med["cloze"], "cloze_lmeval_s": med["lmeval"], "cloze_scratch_s": med["scratch"],
        **agreement(outputs["cloze"], outputs["lmeval"], outputs["scratch"]),
        **matmul_ratio(requests, **model_shape(loaded)),
        "cloze_mean_context_tokens": float(np.mean([len(r.context_ids) for r in requests])),
        "cloze_mean_continuation_tokens": float(np.mean(n_tokens)),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="calibrate bench cloze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model config name")
    parser.add_argument("--dataset", default="arc_easy",
                        help="dataset config name, scored in its cloze format")
    parser.add_argument("--n", type=int, default=16, help="number of records")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--lmeval-batch", type=int, default=16,
                        help="lm-eval's batch size (requests)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (0: torch's default); one by default, as a busy shared "
                             "machine stalls multi-threaded small matmuls and only ratios count")
    parser.add_argument("--output", type=Path, default=Path(BENCH_FILE))
    args = parser.parse_args(argv)
    for name in ("n", "rounds", "lmeval_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and merge its figures into bench.json."""
    import calibrate
    from calibrate.api import dataset_config

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = calibrate.load_model(args.model)
    cfg = dataset_config(args.dataset, limit=args.n, answer_format="cloze")
    records = load_records(cfg)
    prompt_set = build_prompts(records, cfg, loaded.tokenizer)
    requests, labels = list(prompt_set.requests), prompt_set.labels
    settings = ProbeSettings(progress=False)
    print(f"bench_cloze: {args.model} on {args.n} {args.dataset} records, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, device {loaded.device}")
    figures = measure(loaded, requests, labels, settings, args.rounds, args.lmeval_batch)
    figures.update(cloze_bench={"model": args.model, "dataset": args.dataset, "n": args.n,
                                "rounds": args.rounds, "lmeval_batch": args.lmeval_batch,
                                "device": str(loaded.device), "threads": torch.get_num_threads()})
    merge_json(args.output, figures)
    print(f"cloze / lm-eval        = {figures['cloze_over_lmeval']:.3f}   (target <= 1.2)")
    print(f"cloze / from scratch   = {figures['cloze_over_from_scratch']:.3f}")
    print(f"8 etas of cloze steering / cloze = {figures['cloze_steer8_over_cloze']:.3f} at the last "
          f"layer (target <= 2), {figures['cloze_steer8_before_last_over_cloze']:.3f} at the block "
          f"before last; a full cloze pass per eta: {figures['cloze_steer8_full_over_cloze']:.2f}")
    print(f"multiply-adds alone: cloze / lm-eval = {figures['cloze_over_lmeval_matmul']:.3f}, "
          f"of which the lens's full-vocabulary reads are "
          f"{100 * figures['cloze_lens_share_matmul']:.0f}% of cloze's")
    print(f"seconds: cloze {figures['cloze_s']:.2f}, lm-eval {figures['cloze_lmeval_s']:.2f}, "
          f"from scratch {figures['cloze_scratch_s']:.2f}")
    print(f"max |cloze - lm-eval| at the last layer = {figures['cloze_vs_lmeval_max_abs']:.2e}; "
          f"max |cloze - from scratch| at every layer = {figures['cloze_vs_scratch_max_abs']:.2e}")
    print(f"written to {args.output}")
    return figures


if __name__ == "__main__":
    main()
