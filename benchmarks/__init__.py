"""fastdiff's benchmark suite: ``pytest benchmarks/ --benchmark-only``.

Kept apart from ``tests/``: nothing here asserts a timing. Suites:

* ``test_bench_kernels.py``: each fused op (GroupNorm, GroupNorm+SiLU, scale-shift GroupNorm+SiLU, qkv
  attention), forward and forward+backward, against eager PyTorch written the improved-diffusion way and
  ``torch.compile`` of that code, at shapes taken from real UNet configurations (``configs.py``).
* ``test_bench_end_to_end.py``: a training step and DDIM sampling of a whole UNet, fastdiff's default
  kernels against its ``torch`` backend, fp32 and bf16 autocast, with and without gradient checkpointing.
* ``test_bench_reports.py``: the Triton memory-traffic report (``traffic_report.py``) and the compile
  report (``fastdiff.kernels.report``).

Every run writes a summary (JSON, markdown, PNG) through ``report.py``; see ``conftest.py`` for options.
"""
