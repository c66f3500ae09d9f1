"""``python -m fastdiff.selftest``: prove fastdiff's kernels on this machine's device.

Versions, every op at real-model and large shapes against float64, every launch config, determinism,
timings against PyTorch's kernels, first-call times and a UNet train step; writes ``selftest.json`` and
``selftest.md`` and exits non-zero when a check fails. See README, "Proving a new machine".
"""
