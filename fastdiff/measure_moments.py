"""Measure the training data's Gaussian fit for a run that has none:
``python -m fastdiff.measure_moments --model_path RUN/ema_0.9999_100000.pt``.

fastdiff.train writes ``data_moments.npz`` (``fastdiff.diffusion.data_moments``) beside its checkpoints
before training; runs of an earlier fastdiff lack it, and their ODE samplers start from noise. This reads
the run's data settings from the ``run_config.json`` beside ``--model_path`` (its ``--data_dir``, image
size, channels), measures ``--num_items`` items of that data (or of ``--data_dir``) and writes the fit
beside the checkpoint, atomically, so that ``--ode_start auto`` (the default) starts from it.
"""

import os
from collections.abc import Sequence

from fastdiff.cli import parse_command, run_main
from fastdiff.config import RUN_CONFIG_FILENAME, MomentsCommand, find_run_config, load_run_config
from fastdiff.data import build_dataset
from fastdiff.diffusion.data_moments import MOMENTS_FILENAME, DataMoments


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and write the fit with the flags in ``argv`` (``sys.argv`` when None); the exit status."""
    config, given = parse_command(MomentsCommand, argv, "fastdiff.measure_moments", __doc__)
    options = config.moments
    if not options.model_path:
        raise ValueError("--model_path is required: a model*.pt or ema_*.pt file of a fastdiff run")
    run_config_path = find_run_config(options.model_path)
    if run_config_path is None or os.path.basename(run_config_path) != RUN_CONFIG_FILENAME:
        raise ValueError(
            f"--model_path {options.model_path}: no run_config.json beside it (fastdiff.train writes one); "
            "the data's size and channels come from it"
        )
    run = load_run_config(run_config_path)
    data_dir = options.data_dir if "data_dir" in given else run.train.data_dir
    dataset = build_dataset(data_dir, run.model.image_hw, run.model.in_channels)
    moments = DataMoments.measure(dataset, count=options.num_items)
    path = os.path.join(os.path.dirname(os.path.abspath(options.model_path)), MOMENTS_FILENAME)
    moments.save(path)
    print(
        f"wrote {path}: mean, {moments.directions.shape[0]} principal directions and the rest's variance "
        f"of {list(moments.shape)} items, measured on {moments.count} of {data_dir or 'the embedded shapes'}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    run_main(main, "fastdiff.measure_moments")
