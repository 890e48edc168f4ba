#!/usr/bin/env bash
# The offline study on CPU (SmolLM2-135M, Gemma-3-270M, real data), as committed under
# experiments/offline_study/. Run from the repository root after `make setup`.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-experiments/offline_study}
SHARED=${SHARED:-../shared/data}
common="probe.progress=false tracker=none dataset.shuffle=true"

# 1. layer-wise probe: both models x SST-2, ARC-Easy, MMLU (200 each) and Rotten Tomatoes
$PY -m calibrate.run -m $common model=smollm2,gemma3_270m dataset=sst2,arc_easy,mmlu \
    dataset.limit=200 hydra.sweep.dir=$OUT/layerwise
$PY -m calibrate.run -m $common model=smollm2,gemma3_270m dataset=rotten_tomatoes \
    dataset.local_path=$SHARED/rotten_tomatoes dataset.limit=200 hydra.sweep.dir=$OUT/layerwise_rt

# 2. steering and null space: the bundle (direction + nullspace on SST-2, ARC-Easy, MMLU)
$PY -m calibrate.run -m experiment=offline_study probe.progress=false hydra.sweep.dir=$OUT/study

# 3. fitted direction vs the random control, and cross-dataset transfer from SST-2
$PY -m calibrate.run -m $common intervention=direction intervention.eta_scale=residual_norm \
    'eta=[0,0.05,0.1,0.2,0.4]' model=smollm2,gemma3_270m direction.method=layer_diff,random \
    dataset=rotten_tomatoes dataset.local_path=$SHARED/rotten_tomatoes dataset.limit=300 \
    hydra.sweep.dir=$OUT/steer_rt
$PY -m calibrate.run -m $common intervention=direction intervention.eta_scale=residual_norm \
    'eta=[0,0.05,0.1,0.2,0.4]' model=smollm2,gemma3_270m direction.method=random \
    dataset=sst2 dataset.limit=200 hydra.sweep.dir=$OUT/steer_sst2_random
$PY -m calibrate.run -m $common intervention=direction intervention.eta_scale=residual_norm \
    'eta=[0,0.05,0.1,0.2,0.4]' model=smollm2,gemma3_270m direction.source=sst2 \
    direction.source_limit=200 dataset=arc_easy dataset.limit=200 hydra.sweep.dir=$OUT/transfer_arc
$PY -m calibrate.run -m $common intervention=direction intervention.eta_scale=residual_norm \
    'eta=[0,0.05,0.1,0.2,0.4]' model=smollm2,gemma3_270m direction.source=sst2 \
    direction.source_limit=200 dataset=rotten_tomatoes dataset.local_path=$SHARED/rotten_tomatoes \
    dataset.limit=300 hydra.sweep.dir=$OUT/transfer_rt

# 4. one comparison of everything
$PY -m calibrate.compare $OUT/layerwise $OUT/layerwise_rt $OUT/study $OUT/steer_rt \
    $OUT/steer_sst2_random $OUT/transfer_arc $OUT/transfer_rt --out $OUT/compare --relative-depth
