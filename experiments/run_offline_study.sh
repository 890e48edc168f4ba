#!/usr/bin/env bash
# The offline study on CPU (SmolLM2-135M, Gemma-3-270M, real data), as committed under
# experiments/offline_study/. Run from the repository root after `make setup`.
# STEPS="1 2 3 4 5" selects parts (default: all).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-experiments/offline_study}
SHARED=${SHARED:-../shared/data}
STEPS=${STEPS:-1 2 3 4 5 6 7 8 9 10 11}
common="probe.progress=false tracker=none dataset.shuffle=true"
steer="intervention=steering intervention.eta_scale=residual_norm eta=[0,0.05,0.1,0.2,0.4]"
step() { [[ " $STEPS " == *" $1 "* ]]; }

# 1. layer-wise probe: both models x SST-2, ARC-Easy, MMLU (200 each) and Rotten Tomatoes
if step 1; then
  $PY -m calibrate.run -m $common model=smollm2,gemma3_270m dataset=sst2,mmlu \
      dataset.limit=200 hydra.sweep.dir=$OUT/layerwise
  $PY -m calibrate.run -m $common model=smollm2,gemma3_270m dataset=arc_easy \
      dataset.answer_format=letters dataset.limit=200 hydra.sweep.dir=$OUT/layerwise_arc_letters
  $PY -m calibrate.run -m $common model=smollm2,gemma3_270m dataset=rotten_tomatoes \
      dataset.local_path=$SHARED/rotten_tomatoes dataset.limit=200 hydra.sweep.dir=$OUT/layerwise_rt
fi

# 2. steering and the null space on SST-2 (direction + nullspace jobs share one probe)
if step 2; then
  $PY -m calibrate.run -m experiment=offline_study probe.progress=false dataset=sst2 \
      hydra.sweep.dir=$OUT/study
fi

# 3. the fitted direction vs the random control on Rotten Tomatoes, and transfer from SST-2
if step 3; then
  $PY -m calibrate.run -m $common $steer model=smollm2,gemma3_270m \
      direction.method=layer_diff,random dataset=rotten_tomatoes \
      dataset.local_path=$SHARED/rotten_tomatoes dataset.limit=200 hydra.sweep.dir=$OUT/steer_rt
  $PY -m calibrate.run -m $common $steer model=smollm2,gemma3_270m direction.source=sst2 \
      direction.source_limit=200 dataset=rotten_tomatoes dataset.local_path=$SHARED/rotten_tomatoes \
      dataset.limit=200 hydra.sweep.dir=$OUT/transfer_rt
  $PY -m calibrate.run -m $common $steer model=smollm2,gemma3_270m direction.source=sst2 \
      direction.source_limit=200 dataset=arc_easy dataset.answer_format=letters dataset.limit=100 \
      hydra.sweep.dir=$OUT/transfer_arc
fi

# 5. cloze scoring (lm-eval's log-likelihood of each option's text) read at every layer (the
#    committed results were run as `$common model=… dataset=… dataset.limit=300`, the same settings):
#    ARC-Easy (300 of 570, shuffled), ARC-Challenge (all 299), COPA (all 100), HellaSwag (300 of 10042)
if step 5; then
  $PY -m calibrate.run -m experiment=cloze_layerwise hydra.sweep.dir=$OUT/cloze
fi

# 6. does c_hat beat the obvious? c_hat (paper's layer_diff, last three blocks, steered at the last
#    layer) against 32 random directions, the post-hoc baselines and paired intervals: all 872
#    SST-2, 2000 shuffled Rotten Tomatoes (1000 evaluated), 200 shuffled ARC-Easy (cloze) and, for
#    SmolLM2 only, 100 HellaSwag (cloze; its long continuations cost seconds per example on CPU).
#    resume=true: a rerun skips the jobs already complete with the same config.
adj="$common resume=true intervention=steering intervention.eta_scale=residual_norm
     eta=[0,0.02,0.05,0.1] direction.n_random=32 output.predictions=false"
if step 6; then
  $PY -m calibrate.run -m $adj model=smollm2,gemma3_270m dataset=sst2 \
      hydra.sweep.dir=$OUT/adjudicate/sst2
  $PY -m calibrate.run -m $adj model=smollm2,gemma3_270m dataset=rotten_tomatoes \
      dataset.local_path=$SHARED/rotten_tomatoes dataset.limit=2000 \
      hydra.sweep.dir=$OUT/adjudicate/rotten_tomatoes
  $PY -m calibrate.run -m $adj model=smollm2,gemma3_270m dataset=arc_easy dataset.limit=200 \
      hydra.sweep.dir=$OUT/adjudicate/arc_easy_cloze
fi

# 7. which direction? every direction method, fit on the calibration split, steered at the last
#    layer and judged like step 6 (null, baselines, paired intervals), on the same rows
methods="model=smollm2,gemma3_270m direction.method=layer_diff,mean_diff,pca,probe,gradient"
if step 7; then
  $PY -m calibrate.run -m $adj $methods dataset=sst2 hydra.sweep.dir=$OUT/methods/sst2
  $PY -m calibrate.run -m $adj $methods dataset=rotten_tomatoes \
      dataset.local_path=$SHARED/rotten_tomatoes dataset.limit=2000 \
      hydra.sweep.dir=$OUT/methods/rotten_tomatoes
  $PY -m calibrate.run -m $adj $methods dataset=arc_easy dataset.limit=200 \
      hydra.sweep.dir=$OUT/methods/arc_easy_cloze
fi
if step 6; then
  $PY -m calibrate.run -m $adj model=smollm2 dataset=hellaswag dataset.limit=100 \
      hydra.sweep.dir=$OUT/adjudicate/hellaswag_cloze
fi

# 8. prompt styles: the layer-wise probe at 0, 1 and 5 shots (exemplars as lm-eval draws them),
#    and SmolLM2-Instruct with its chat template (Gemma-3-270M's tokenizer has none): two MMLU
#    subjects (letters), all of SST-2, 100 shuffled ARC-Easy (cloze)
if step 8; then
  styles="$common resume=true output.predictions=false"
  for data in "dataset=mmlu dataset.subjects=[high_school_geography,marketing]" "dataset=sst2" \
              "dataset=arc_easy dataset.limit=100"; do
    name=$(echo "$data" | sed 's/dataset=\([a-z0-9_]*\).*/\1/')
    $PY -m calibrate.run -m $styles $data model=smollm2,gemma3_270m prompt.shots=0,1,5 \
        hydra.sweep.dir=$OUT/prompt_styles/$name
    $PY -m calibrate.run -m $styles $data model=smollm2 prompt.chat_template=true prompt.shots=0,5 \
        hydra.sweep.dir=$OUT/prompt_styles/${name}_chat
  done
fi

# 9. c_hat across prompt styles: SST-2 with 800 evaluated rows (5-shot exemplars from the 72 left
#    over), each style's own c_hat, then zero-shot c_hat on 5-shot prompts and the reverse
if step 9; then
  tr="$common resume=true intervention=steering intervention.eta_scale=residual_norm eta=[0,0.02,0.05,0.1]
      direction.n_random=32 output.predictions=false model=smollm2,gemma3_270m dataset=sst2
      dataset.limit=800"
  $PY -m calibrate.run -m $tr prompt.shots=0,5 hydra.sweep.dir=$OUT/prompt_styles/transfer_own
  $PY -m calibrate.run -m $tr prompt.shots=5 'direction.source_prompt={shots:0}' \
      hydra.sweep.dir=$OUT/prompt_styles/transfer_zero_to_five
  $PY -m calibrate.run -m $tr prompt.shots=0 'direction.source_prompt={shots:5}' \
      hydra.sweep.dir=$OUT/prompt_styles/transfer_five_to_zero
fi

# 10. issue 25: the adjudication again with seeds as an axis: 5 seeds (each re-splits the rows,
#     redraws the 1,000 random directions of the null and the resamples; dataset.seed stays 0 so
#     every seed reads the same records and the cached probe), c_hat steered at the last layer,
#     eta in {0.02, 0.05, 0.1} x the mean residual norm, the null at equal norm and at matched KL,
#     2,000 paired resamples at the steered cells with Holm's correction, the six baselines, T(eta);
#     then the gradient direction with eta=fit (its own fitted norm) besides the same grid. All 872
#     SST-2, 1000 of the 10662 Rotten Tomatoes and 200 of the 570 ARC-Easy (cloze), shuffled: the
#     full sets did not fit the time the shared 2-core CPU had (run 2026-12-03, three sweeps at once).
#     Cloze ARC-Easy runs without the random-direction null (direction.n_random=0): with several
#     continuation tokens per option its null needs forward passes per direction and eta, which
#     did not fit either; its seeds still re-split, redraw the resamples and fit the baselines
seeds="$common resume=true intervention=steering intervention.eta_scale=residual_norm
       output.predictions=false output.plots=false dataset.seed=0"
if step 10; then
  $PY -m calibrate.run -m $seeds model=smollm2,gemma3_270m dataset=sst2 eta=[0,0.02,0.05,0.1] \
      seed=0,1,2,3,4 hydra.sweep.dir=$OUT/seeds/sst2
  $PY -m calibrate.run -m $seeds model=smollm2,gemma3_270m dataset=sst2 direction.method=gradient \
      eta=[0,0.02,0.05,0.1,fit] seed=0,1,2,3,4 hydra.sweep.dir=$OUT/seeds/sst2_gradient
  $PY -m calibrate.run -m $seeds model=smollm2,gemma3_270m dataset=rotten_tomatoes \
      dataset.local_path=$SHARED/rotten_tomatoes dataset.limit=1000 eta=[0,0.02,0.05,0.1] \
      seed=0,1,2,3,4 hydra.sweep.dir=$OUT/seeds/rotten_tomatoes
  $PY -m calibrate.run -m $seeds model=smollm2,gemma3_270m dataset=arc_easy \
      dataset.limit=200 eta=[0,0.02,0.05,0.1] direction.n_random=0 seed=0,1,2,3,4 \
      hydra.sweep.dir=$OUT/seeds/arc_easy_cloze
  # (run 2026-12-03: Gemma's cloze sweep stopped after seeds 0-2; seeds 3-4 were run on
  #  2026-12-04 with the same overrides and seed=3,4 into $OUT/seeds/arc_easy_cloze_gemma_s34)
  # cloze ARC-Easy's null at the last layer: each random direction and eta rereads the context's
  # last state through the lens (full-vocabulary log-softmax: no pass of the blocks, but no
  # option-rows-only algebra either), so a small null of 64 directions (p resolution 1/65), at
  # equal norm only (matching needs a read per trial eta); SmolLM2 only (Gemma's 262k-token
  # vocabulary makes each read ~6x dearer and did not fit the session)
  $PY -m calibrate.run -m $seeds model=smollm2 dataset=arc_easy dataset.limit=200 \
      eta=[0,0.02,0.05,0.1] direction.n_random=64 seed=0,1,2,3,4 \
      hydra.sweep.dir=$OUT/seeds/arc_easy_cloze_null
  # twice the Rotten Tomatoes rows (2000 shuffled, 1000 evaluated), one model per sweep
  $PY -m calibrate.run -m $seeds model=smollm2 dataset=rotten_tomatoes \
      dataset.local_path=$SHARED/rotten_tomatoes dataset.limit=2000 eta=[0,0.02,0.05,0.1] \
      seed=0,1,2,3,4 hydra.sweep.dir=$OUT/seeds/rotten_tomatoes_2000
  $PY -m calibrate.run -m $seeds model=gemma3_270m dataset=rotten_tomatoes \
      dataset.local_path=$SHARED/rotten_tomatoes dataset.limit=2000 eta=[0,0.02,0.05,0.1] \
      seed=0,1,2,3,4 hydra.sweep.dir=$OUT/seeds/rotten_tomatoes_2000_gemma
  # the full sets (run 2026-12-04, one thread per sweep beside other work): all 10,662 Rotten
  # Tomatoes sentences for both models; all 570 ARC-Easy questions for SmolLM2, its seeds split
  # over two sweeps run side by side; Gemma's seed 0 only (~35 min a seed here)
  $PY -m calibrate.run -m $seeds model=smollm2 dataset=rotten_tomatoes \
      dataset.local_path=$SHARED/rotten_tomatoes eta=[0,0.02,0.05,0.1] \
      seed=0,1,2,3,4 hydra.sweep.dir=$OUT/seeds/rotten_tomatoes_full
  $PY -m calibrate.run -m $seeds model=gemma3_270m dataset=rotten_tomatoes \
      dataset.local_path=$SHARED/rotten_tomatoes eta=[0,0.02,0.05,0.1] \
      seed=0,1,2,3,4 hydra.sweep.dir=$OUT/seeds/rotten_tomatoes_full_gemma
  $PY -m calibrate.run -m $seeds model=smollm2 dataset=arc_easy eta=[0,0.02,0.05,0.1] \
      direction.n_random=0 seed=0,1,2 hydra.sweep.dir=$OUT/seeds/arc_easy_cloze_full
  $PY -m calibrate.run -m $seeds model=smollm2 dataset=arc_easy eta=[0,0.02,0.05,0.1] \
      direction.n_random=0 seed=3,4 hydra.sweep.dir=$OUT/seeds/arc_easy_cloze_full_s34
  $PY -m calibrate.run -m $seeds model=gemma3_270m dataset=arc_easy eta=[0,0.02,0.05,0.1] \
      direction.n_random=0 seed=0 hydra.sweep.dir=$OUT/seeds/arc_easy_cloze_full_gemma
  $PY -m calibrate report $OUT/seeds/{sst2,sst2_gradient,rotten_tomatoes,arc_easy_cloze} \
      --out $OUT/seeds/report --dpi 60
fi

# 11. confidence-regulation neurons (issue 22): the MLP neurons of the last block, from the
#     weights, related to c_hat and mean-ablated (total and direct effect), 1000 matched-norm
#     random neurons (sets) as the null; SST-2, Rotten Tomatoes, ARC-Easy read as letters and
#     ARC-Easy cloze (ablation at every position that scores a continuation token; each arm
#     reads the full vocabulary per scored token, so few null draws). Sizes shrunk to what the
#     shared 2-core CPU allowed (seed-shuffled first rows; half evaluated): SmolLM2 all 872
#     SST-2, 600 Rotten Tomatoes, 300 ARC-Easy; Gemma-3-270M 400 / 400 / 200.
#     MODELS picks the models (run one process per model to use two cores).
MODELS=${MODELS:-smollm2 gemma3_270m}
nrn="$common resume=true output.predictions=false intervention=neurons intervention.blocks=1
     intervention.n_null=1000 intervention.null_pool=64"
if step 11; then
  for m in $MODELS; do
    if [[ $m == smollm2 ]]; then sizes=("" 600 300); else sizes=(400 400 200); fi  # "": all
    $PY -m calibrate.run $nrn model=$m dataset=sst2 ${sizes[0]:+dataset.limit=${sizes[0]}} \
        hydra.run.dir=$OUT/neurons/sst2/$m
    $PY -m calibrate.run $nrn model=$m dataset=rotten_tomatoes dataset.limit=${sizes[1]} \
        dataset.local_path=$SHARED/rotten_tomatoes hydra.run.dir=$OUT/neurons/rotten_tomatoes/$m
    $PY -m calibrate.run $nrn model=$m dataset=arc_easy dataset.answer_format=letters \
        dataset.limit=${sizes[2]} hydra.run.dir=$OUT/neurons/arc_easy_letters/$m
    # cloze: every arm reads the full vocabulary at every scored token; 20 null draws for
    # SmolLM2, 10 for Gemma (its 262k vocabulary makes every draw costly)
    if [[ $m == smollm2 ]]; then cz_null=20; else cz_null=10; fi
    $PY -m calibrate.run $nrn model=$m dataset=arc_easy intervention.n_null=$cz_null \
        dataset.limit=${sizes[2]} hydra.run.dir=$OUT/neurons/arc_easy_cloze/$m
    # the last three blocks on SST-2: candidates below the last block run the blocks above them
    # (on the key/value cache) for every arm, so 200 null draws instead of 1000
    $PY -m calibrate.run $nrn model=$m dataset=sst2 ${sizes[0]:+dataset.limit=${sizes[0]}} \
        intervention.blocks=3 intervention.n_null=200 hydra.run.dir=$OUT/neurons/sst2_last3/$m
  done
fi

# 4. one report of everything: report.html (self-contained) and report.md, figures, tables
if step 4; then
  sweeps=""
  for s in layerwise layerwise_rt study steer_rt transfer_rt transfer_arc cloze adjudicate/sst2 \
           adjudicate/rotten_tomatoes adjudicate/arc_easy_cloze methods/sst2 methods/rotten_tomatoes \
           methods/arc_easy_cloze prompt_styles/mmlu prompt_styles/sst2 prompt_styles/arc_easy \
           prompt_styles/transfer_own prompt_styles/transfer_zero_to_five \
           prompt_styles/transfer_five_to_zero; do
    [[ -d $OUT/$s ]] && sweeps="$sweeps $OUT/$s"
  done
  $PY -m calibrate report $sweeps --out $OUT/compare --dpi 60
fi
