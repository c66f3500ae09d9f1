"""What training and inference both run on, one role per module; nothing here imports fastdiff.training.

checkpoint   improved-diffusion's file names, atomic writes, finding states, key checks
precision    bf16 / fp16 / fp32 with torch.amp, and whether the device can run them
rng          seeding, saving and restoring generators, per-step timesteps and noise
image_grid   uint8 conversion and PNG grids (numpy + Pillow)
backends     the --kernels and --autotune choices, checked for the device
generate     samples from fixed starting noise (the grids, the in-training evaluation)
inference    a trained model with its run config, weights, precision and kernels (sample, nll, evaluate)
"""
