"""``python -m fastdiff.selftest``: prove fastdiff's kernels on this machine's device within a time budget.

Groups, in priority order (``groups.GROUPS``): versions, accuracy, determinism, train_step, kernel_timing,
large, all_configs. Each group plans named checks; the runner (``run``) runs them while the budget lasts,
rewrites ``selftest.json`` and ``selftest.md`` after every check and reports what it could not run as
``not run``. See docs/kernels.md, "Checking a new machine".
"""
