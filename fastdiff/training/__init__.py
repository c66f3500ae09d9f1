"""The training loop and its parts, one role per module.

config       LoopSettings, the per-rank / global batch size rule, microbatch checks
loop         TrainLoop: the step (microbatches, autocast, DDP), logging, saving, resuming
precision    bf16 / fp16 / fp32 with torch.amp, and whether the device can run them
optim        AdamW or apex FusedAdam, improved-diffusion's linear LR anneal
ema          fp32 parameter EMAs for improved-diffusion's comma-separated rates
nonfinite    non-finite steps: skipped on the device, counted, fatal after --max_bad_steps in a row
rng          seeding, saving and restoring generators, per-step timesteps and noise
checkpoint   improved-diffusion's file names, atomic writes, finding states, key checks
resume       where a run resumes from, and checking a full state before any of it loads
metrics      loss terms by timestep quartile and per-step scalars, reduced over ranks
reporters    status lines, progress.csv, TensorBoard, the tqdm bar
preview      PNG grids of EMA samples during training
quality      FID/KID/precision/recall of EMA samples every --eval_interval, the best EMA checkpoint
image_grid   uint8 conversion and PNG grids (numpy + Pillow)
stop         SIGTERM / SIGINT as a flag the loop polls
model_flags  model_flags.json beside the checkpoints, read by sample and nll
cli          flag helpers shared by the three entry points
"""
