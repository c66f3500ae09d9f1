"""The command-line layer: config bundles as argparse, parsed once, with the flags given tracked.

Every entry point (train, sample, nll, evaluate) describes its flags by a bundle of config sections
(``fastdiff.config``); this module turns it into an argument parser (one group per section, each flag
typed, checked and documented by its field) and back into a checked bundle.

Where a value comes from, later wins: the field's default, then the command's preset (fastdiff.train's
embedded profile, only where it applies), then a ``--config FILE`` (fastdiff.train), then the command
line. A flag given twice on the command line takes its last value (argparse's rule, as in
improved-diffusion's scripts).
"""

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastdiff import dist_util
from fastdiff.config import Bundle, ConfigError, RunConfig, load_run_config
from fastdiff.runtime.checkpoint import CheckpointWriteError

CONFIG_FLAG = "config"


def str2bool(value: str | bool) -> bool:
    """``yes/true/t/y/1`` -> True, ``no/false/f/n/0`` -> False (any case); else an argparse error."""
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (yes/no, true/false, 1/0), got {value!r}")


def flag_type(kind: type) -> Callable[[str], Any]:
    """The argparse type of a field of ``kind``: bools parse with :func:`str2bool`."""
    return str2bool if kind is bool else kind


def build_parser(
    bundle: type[Bundle],
    prog: str,
    description: str,
    epilog: str = "",
    config_file: bool = False,
) -> argparse.ArgumentParser:
    """The parser of ``python -m {prog}``: one ``--flag`` per field ``bundle`` places (a positional argument
    for the fields its placement lists as positional), grouped by section.

    Defaults are left out of the namespace (``argparse.SUPPRESS``), so what it holds is exactly what was
    given; the help shows each default.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description=description,
        epilog=epilog or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    if config_file:
        parser.add_argument(
            f"--{CONFIG_FLAG}",
            metavar="FILE",
            help="a run_config.json (or model_flags.json) to start from; command-line flags override it",
        )
    specs = bundle.flag_specs()
    groups = {name: parser.add_argument_group(f"{kind.title} flags") for name, kind, _ in bundle.sections()}
    for spec in specs.values():
        if spec.positional:
            groups[spec.section].add_argument(
                spec.flag,
                type=str if spec.parse else flag_type(spec.kind),
                metavar=spec.flag.upper(),
                help=spec.help,
            )
            continue
        bare = {"nargs": "?", "const": True} if spec.kind is bool else {}  # `--quick` is `--quick True`
        groups[spec.section].add_argument(
            f"--{spec.flag}",
            type=str if spec.parse else flag_type(spec.kind),
            metavar=getattr(spec.parse, "metavar", "VALUE") if spec.parse else spec.kind.__name__.upper(),
            help=f"{spec.help} (default: {spec.default!r})".replace("%", "%%"),
            **bare,
        )
    return parser


def parse_command(
    bundle: type[Bundle],
    argv: Sequence[str] | None,
    prog: str,
    description: str,
    *,
    epilog: str = "",
    preset: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    config_file: bool = False,
) -> tuple[Bundle, set[str]]:
    """``(checked bundle, flags given on the command line)`` from ``argv`` (``sys.argv[1:]`` when None).

    ``preset(given_values)`` returns flag values to apply under the command line (and under ``--config``); a
    ConfigError from any source is a ValueError naming the flag (and the file).
    """
    parser = build_parser(bundle, prog, description, epilog, config_file)
    given_values = vars(parser.parse_args(argv))
    config_path = given_values.pop(CONFIG_FLAG, None)
    given = set(given_values)
    config = bundle()
    try:
        if preset is not None and config_path is None:
            config = config.with_flags(preset(given_values), "the preset")
        if config_path is not None:
            if bundle is not RunConfig:
                raise TypeError(f"--{CONFIG_FLAG} reads a RunConfig, not a {bundle.__name__}")
            config = load_run_config(config_path)
        config = config.with_flags(given_values)
    except ConfigError as error:
        raise ValueError(str(error)) from None
    return config, given


def run_main(
    main: Callable[[Sequence[str] | None], int],
    program: str,
    expected: tuple[type[BaseException], ...] = (),
) -> None:
    """Run ``main`` and exit; bad input (ValueError, FileNotFoundError), a failed checkpoint write and the
    ``expected`` errors print one line instead of a traceback."""
    try:
        code = main(None)
    except (ValueError, FileNotFoundError, CheckpointWriteError, *expected) as error:
        ranks = int(os.environ.get("WORLD_SIZE", "1") or 1)
        where = f" (rank {os.environ.get('RANK', '0')})" if ranks > 1 else ""
        print(f"{program}: error{where}: {error}", file=sys.stderr, flush=True)
        dist_util.cleanup_dist()
        sys.exit(2)
    sys.exit(code)
