#!/bin/bash
cd /work/wt-lens
export OMP_NUM_THREADS=1 MPLBACKEND=Agg WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=/work/wt-lens:/tmp/noeditable
COMMON="model=smollm2 dataset=sst2 dataset.limit=200 tracker=none intervention=steering intervention.layers=[24] intervention.eta_scale=residual_norm eta=[0,0.05,0.1,0.2,0.4] direction.n_random=0 probe.progress=false output.predictions=false"
/work/main/.venv/bin/python -m calibrate.run $COMMON lens=logit hydra.run.dir=/tmp/lenswork/steer/logit
/work/main/.venv/bin/python -m calibrate.run $COMMON lens=tuned lens.text_path=/work/wt-lens/experiments/lens_study/lens_text.txt hydra.run.dir=/tmp/lenswork/steer/tuned
/work/main/.venv/bin/python -m calibrate.run $COMMON lens=affine lens.text_path=/work/wt-lens/experiments/lens_study/lens_text.txt hydra.run.dir=/tmp/lenswork/steer/affine
