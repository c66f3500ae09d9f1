"""The training loop and its parts, one role per module (what inference shares is in fastdiff.runtime).

loop         TrainLoop: the step (microbatches, autocast, DDP), logging, saving, resuming
state        the saved training state as one registry of stateful parts
resume       where a run resumes from, and checking a full state before any of it loads
optim        AdamW or apex FusedAdam, improved-diffusion's linear LR anneal
ema          fp32 parameter EMAs for improved-diffusion's comma-separated rates
nonfinite    non-finite steps: skipped on the device, counted, fatal after --max_bad_steps in a row
class_dropout  class labels replaced by the null class (classifier-free guidance)
metrics      loss terms by timestep quartile and per-step scalars, reduced over ranks
reporters    status lines, progress.csv, TensorBoard, the tqdm bar
preview      PNG grids of EMA samples during training
quality      FID/KID/precision/recall of EMA samples every --eval_interval, the best EMA checkpoint
stop         SIGTERM / SIGINT as a flag the loop polls
"""
