"""Every command and example in README.md and docs/*.md, checked against the code so the docs cannot drift.

Commands are the lines of the ```bash blocks: continuation lines joined, ``# comments`` dropped, ``a && b``
split into two commands, and leading ``VAR=value`` assignments kept as the command's environment. Each
command gets one kind, shown in its test id:

- ``run``: ``python -m fastdiff.{train,sample,nll,evaluate,prepare_data}``. Run in this process as
  ``python -m`` runs it (``runpy``), at small sizes (``small_args``: 2 training steps, 4 samples, a 16x16
  model, ...), in one scratch directory holding the data folders, checkpoints and sample files the docs
  name (``workspace``).
  They run in the order the docs give them, README first.
- ``parse``: everything else, for the reason ``PARSE_ONLY`` gives (torchrun needs GPUs, pip installs,
  benchmarks run for minutes or hours). Nothing runs; the flags are checked.
- ``parse-inline``: a command written inline in prose (```python -m ...```, ```torchrun ...```, ```pytest
  ...```, ```pip install ...```), checked like ``parse``.

A command written in several places is checked once, under the id of its first place.

Every command, run or not, is parsed first: the flags go through the entry point's own argparse parser (for
torchrun, torchrun's parser and then the module's; for pip, pip's; for pytest, its ``--help``), and a flag
the parser does not define exactly (unknown, or an abbreviation argparse would accept) fails.

Python blocks run as written; README's three-line kernel block gets the tensors its text names. Relative
links must name files (and headings) inside the repository.
"""

import argparse
import ast
import contextlib
import functools
import importlib.util
import io
import itertools
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_inception import require_inception

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

RUN_MODULES = (
    "fastdiff.train",
    "fastdiff.sample",
    "fastdiff.nll",
    "fastdiff.evaluate",
    "fastdiff.prepare_data",
    "fastdiff.measure_moments",
)
"""Entry points whose documented commands run here at small sizes."""

PARSE_ONLY = {
    "torchrun": "torchrun starts one process per GPU",
    "pip": "installs or downloads packages; pins must equal .ci/run's or setup.py's, extras must exist",
    "pytest": "a test or benchmark session of its own; its paths must exist",
    "fastdiff.selftest": "minutes of checks (tests/test_selftest.py runs --quick)",
    "fastdiff.selftest.precompile": "compiles 262 kernels for a GPU (tests/test_precompile.py)",
    "fastdiff.kernels.report": "compiles every kernel configuration for two GPU targets (about 150 s)",
    "benchmarks.training_quality": "trains the main job per seed and variant: an hour or more",
    "benchmarks.sampler_sweep": "samples and scores a trained main job many times",
    "benchmarks.solver_error": "solves the sampling ODE to convergence for every sampler",
    "benchmarks.loader_throughput": "writes 512 JPEGs and times five loaders for minutes",
}
"""Why a command is parsed and not run, by launcher or module."""

PLACEHOLDERS = {"NODE_RANK": "0", "MASTER_HOST": "localhost"}
"""Shell variables the docs' commands use, with a value for parsing."""

MOVED_ROOTS = ("/data/", "/models/")
"""Absolute paths in the docs that stand for the user's files: they map into the workspace."""

DOCUMENTED_RUNS = {
    "runs/fastdiff/model001500.pt": ("main", "model"),
    "runs/fastdiff/ema_0.99_001500.pt": ("main", "ema"),
    "runs/in64/ema_0.9999_500000.pt": ("main", "ema"),
    "runs/guided/ema_0.99_001500.pt": ("guided", "ema"),
    "runs/faces_latents/ema_0.9999_100000.pt": ("latent", "ema"),
}
"""Checkpoints the docs read, and which tiny training run of the workspace stands for each."""

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
"""Whether the latent-diffusion commands can run (without diffusers they are skipped)."""
DOCUMENTED_VAE = "models/sd-vae"
"""The VAE folder the docs name (``/models/sd-vae``): the small random AutoencoderKL of tests/small_vae.py
(downsampling factor 2: the docs' 16x16 images become 8x8 latents)."""
WORKSPACE_LATENTS = "data/workspace_latents"
"""The latent dataset the workspace's latent run trains on (data/faces encoded with DOCUMENTED_VAE)."""

TINY_RUNS = {
    "main": [],
    "guided": ["--class_dropout_prob", "0.1"],
    "latent": ["--data_dir", WORKSPACE_LATENTS, "--ema_rate", "0.99"],
}
"""The workspace's training runs: the main job (embedded profile), with a null class for guidance, and on
latents (the tiny model of LATENT_MODEL)."""

LATENT_MODEL = {"num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2", "attention_resolutions": "4",
                "num_head_channels": -1}  # fmt: skip
"""A training command on a latent dataset (its --data_dir ends in ``_latents``) takes its size from the
data, 8x8 here: it trains this tiny model instead of the one it names."""


@dataclass(frozen=True)
class Command:
    """One documented command: where it is written, its environment assignments, its words, and whether it
    is written inline in prose (else in a ```bash block)."""

    where: str
    env: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]
    inline: bool = False

    @property
    def text(self) -> str:
        return " ".join([*(f"{name}={value}" for name, value in self.env), *map(shlex.quote, self.argv)])


def _fenced_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """``(first line number, body)`` of every ```language block of ``path``."""
    text = path.read_text()
    pattern = re.compile(rf"^```{language}\n(.*?)^```", flags=re.S | re.M)
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1)) for match in pattern.finditer(text)]


INLINE = re.compile(r"`((?:python -m|torchrun|pytest|pip install) [^`]*)`")
"""A command written inline in prose (parsed only; a last word ``...`` marks it as elided)."""


def _expand(word: str, where: str) -> str:
    def value(match: re.Match) -> str:
        if match.group(1) not in PLACEHOLDERS:
            raise AssertionError(f"{where}: ${match.group(1)} has no value in PLACEHOLDERS")
        return PLACEHOLDERS[match.group(1)]

    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", value, word)


def commands_in(path: Path) -> list[Command]:
    """The commands of ``path``'s ```bash blocks in order, then those written inline in its prose."""
    found = []
    relative = path.relative_to(ROOT).as_posix()
    for first_line, body in _fenced_blocks(path, "bash"):
        lines = body.splitlines()
        index = 0
        while index < len(lines):
            start, line = index, lines[index]
            while line.endswith("\\"):
                index += 1
                line = line[:-1] + " " + lines[index]
            index += 1
            where = f"{relative}:{first_line + start}"
            words = [_expand(word, where) for word in shlex.split(line, comments=True)]
            chain = "&&" in words  # a && b && c: README.md:4#1, #2, #3
            for number in itertools.count(1):
                if not words:  # a blank or comment line; or the chain is done
                    break
                cut = words.index("&&") if "&&" in words else len(words)
                part, words = words[:cut], words[cut + 1 :]
                env = []
                while part and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", part[0]):
                    name, value = part.pop(0).split("=", 1)
                    env.append((name, value))
                assert part, f"{where}: an environment assignment with no command"
                found.append(Command(f"{where}#{number}" if chain else where, tuple(env), tuple(part)))
    prose = re.sub(r"^```.*?^```", lambda block: "\n" * block.group(0).count("\n"), path.read_text(),
                   flags=re.S | re.M)  # fmt: skip
    for match in INLINE.finditer(prose):
        where = f"{relative}:{prose.count(chr(10), 0, match.start()) + 1}"
        words = [_expand(word, where) for word in shlex.split(match.group(1))]
        found.append(Command(where, (), tuple(words[:-1] if words[-1] == "..." else words), inline=True))
    return found


def all_commands() -> list[Command]:
    """Every distinct command of README.md and docs/*.md, at its first place (README first; a command of a
    bash block before the same command written inline)."""
    found = [command for path in DOC_FILES for command in commands_in(path)]
    seen: dict[tuple, Command] = {}
    for command in sorted(found, key=lambda command: command.inline):  # stable: document order
        seen.setdefault((command.env, command.argv), command)
    return list(seen.values())


def split_launcher(argv: tuple[str, ...]) -> tuple[str, str, list[str]]:
    """``(launcher, module, args)``: launcher is python, python-c (``python -c CODE``), torchrun, pip,
    pytest or script (``tools/NAME.sh``); module is what ``python -m`` / ``torchrun -m`` runs, the script's
    path for a script ("" for the others)."""
    if argv[0] in ("python", "python3") and len(argv) == 3 and argv[1] == "-c":
        return "python-c", "", [argv[2]]
    if argv[0] in ("python", "python3") and len(argv) > 2 and argv[1] == "-m":
        if argv[2] in ("pip", "pytest"):
            return argv[2], "", list(argv[3:])
        return "python", argv[2], list(argv[3:])
    if argv[0] in ("pip", "pytest"):
        return argv[0], "", list(argv[1:])
    if re.fullmatch(r"tools/\w+\.sh", argv[0]):
        return "script", argv[0], list(argv[1:])
    if argv[0] == "torchrun":
        from torch.distributed import run as torchrun

        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                parsed = torchrun.get_args_parser().parse_args(list(argv[1:]))
            except SystemExit:
                raise AssertionError(f"torchrun refused {argv[1:]}: {_last_line(stderr)}") from None
        assert parsed.module, "torchrun commands run a module: torchrun ... -m fastdiff.train"
        return "torchrun", parsed.training_script, list(parsed.training_script_args)
    raise AssertionError(f"not a command the docs test knows how to check: {shlex.join(argv)}")


def kind_of(command: Command) -> str:
    if command.inline or command.argv[0] == "torchrun":
        return "parse"
    launcher, module, _ = split_launcher(command.argv)
    return "run" if launcher == "python" and module in RUN_MODULES else "parse"


COMMANDS = all_commands()


# ------------------------------------------------------------------------------------------- parsing


def _last_line(stream: io.StringIO) -> str:
    """An argparse error's last line (the usage above it is long)."""
    lines = stream.getvalue().strip().splitlines()
    return lines[-1] if lines else "(no message)"


class _Parsed(BaseException):
    """Raised by the entry point's first parse of all its arguments, to stop it before it does anything."""

    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace | None):
        super().__init__()
        self.parser, self.namespace = parser, namespace


@contextlib.contextmanager
def _as_main(module: str, args: list[str]):
    """sys.argv as ``python -m module args`` sets it; runpy's note about re-running an imported module is
    expected here (the tests import the entry points too)."""
    with mock.patch.object(sys, "argv", [module, *args]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*found in sys.modules.*", category=RuntimeWarning)
        yield


def entry_point_parser(module: str, args: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser ``python -m module`` builds and the namespace it gives ``args``, with nothing run. For
    arguments that name CUDA, CUDA looks present (8 devices): ``--device cuda:1`` parses as on the machines
    the docs mean."""
    original = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        # parse_args calls this too. A parser that leaves words over (a pre-parser) is let through.
        try:
            namespace, extras = original(self, args, namespace)
        except SystemExit as exit:
            if exit.code == 0:  # --help
                raise _Parsed(self, None) from None
            raise
        if extras:
            return namespace, extras
        raise _Parsed(self, namespace)

    stderr = io.StringIO()
    cuda = any("cuda" in word for word in args)
    with (
        _as_main(module, args),
        mock.patch.object(argparse.ArgumentParser, "parse_known_args", parse_known_args),
        mock.patch.object(torch.cuda, "is_available", lambda: True) if cuda else contextlib.nullcontext(),
        mock.patch.object(torch.cuda, "device_count", lambda: 8) if cuda else contextlib.nullcontext(),
        contextlib.redirect_stderr(stderr),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except _Parsed as parsed:
            return parsed.parser, parsed.namespace
        except SystemExit:
            raise AssertionError(f"python -m {module} refused {args}: {_last_line(stderr)}") from None
    raise AssertionError(f"python -m {module} never parsed its arguments")


def option_words(args: list[str]) -> list[str]:
    """The option names in ``args`` (``--a=1`` -> ``--a``; values and negative numbers left out)."""
    return [word.split("=", 1)[0] for word in args if re.match(r"--?[A-Za-z]", word)]


def assert_exact_options(parser: argparse.ArgumentParser, args: list[str], what: str) -> None:
    defined = {option for action in parser._actions for option in action.option_strings}
    unknown = [word for word in option_words(args) if word not in defined]
    assert not unknown, f"{what} does not define {unknown} (an abbreviation counts as unknown)"


@functools.cache
def pytest_help() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def setup_py_extras() -> dict[str, list[str]]:
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extras_require")


def check_pip(args: list[str]) -> None:
    """pip's own parser reads the options of the subcommand (install, download, wheel, ...); a pinned
    requirement must be pinned the same in .ci/run or setup.py, and an extra of fastdiff must exist."""
    from pip._internal.commands import commands_dict, create_command  # pip's own parsers (not a public API)

    assert args and args[0] in commands_dict, f"pip {args}: not a pip command"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            options, requirements = create_command(args[0]).parse_args(args[1:])
        except SystemExit:
            raise AssertionError(f"pip refused {args}: {_last_line(stderr)}") from None
    pinned_here = (ROOT / ".ci" / "run").read_text() + (ROOT / "setup.py").read_text()
    extras = setup_py_extras()
    for requirement in [*requirements, *getattr(options, "editables", [])]:
        if "==" in requirement:
            assert requirement in pinned_here, f"{requirement}: .ci/run and setup.py pin another version"
        match = re.fullmatch(r"(\.|fastdiff)\[([\w,]+)\]", requirement)
        if match:
            missing = set(match.group(2).split(",")) - set(extras)
            assert not missing, f"{requirement}: setup.py has no extra {sorted(missing)}"


def check_pytest(args: list[str]) -> None:
    help_text = pytest_help()
    for word in option_words(args):
        assert re.search(rf"(^|[\s,]){re.escape(word)}([\s=,]|$)", help_text, flags=re.M), (
            f"pytest does not know {word}"
        )
    for previous, word in zip(["", *args], args, strict=False):
        if not word.startswith("-") and previous not in ("-k", "-m", "-p", "-o"):  # not an option's value
            assert (ROOT / word).exists(), f"pytest path {word} does not exist"


def check_script(path: str, args: list[str]) -> None:
    """The script exists, is executable, and its usage line names every argument."""
    script = ROOT / path
    assert script.is_file() and os.access(script, os.X_OK), f"{path} is not an executable file"
    usage = next((line for line in script.read_text().splitlines() if f"usage: {path}" in line), "")
    for word in args:
        named = re.search(rf"(^|[\s\[|]){re.escape(word)}($|[\s\]|])", usage)
        assert named, f"{path}'s usage lacks {word}"


def check_environment(command: Command) -> None:
    """Each ``VAR=value`` of a command is read somewhere in the repository."""
    patterns = ("fastdiff/**/*.py", "kernels/*.py", "benchmarks/*.py", "tests/*.py", "tools/*.sh")
    text = "\n".join(path.read_text() for pattern in patterns for path in ROOT.glob(pattern))
    for name, _ in command.env:
        assert name in text, f"{command.where}: {name} is read nowhere in {', '.join(patterns)}"


def parse_command(command: Command) -> tuple[argparse.ArgumentParser | None, argparse.Namespace | None]:
    """Check ``command``'s flags without running it; the entry point's parser and namespace when it has
    one."""
    check_environment(command)
    launcher, module, args = split_launcher(command.argv)
    if launcher == "pip":
        check_pip(args)
        return None, None
    if launcher == "pytest":
        check_pytest(args)
        return None, None
    if launcher == "script":
        check_script(module, args)
        return None, None
    if launcher == "python-c":  # a one-line check: it must at least be valid Python
        compile(args[0], command.where, "exec")
        return None, None
    # An entry point is run until it parses its arguments: only modules known to use argparse.
    assert module in RUN_MODULES or module in PARSE_ONLY, (
        f"{command.where}: say in RUN_MODULES or PARSE_ONLY how to check python -m {module}"
    )
    if launcher == "torchrun":
        from torch.distributed import run as torchrun

        torchrun_args = list(command.argv[1 : len(command.argv) - len(args)])
        assert_exact_options(torchrun.get_args_parser(), torchrun_args, "torchrun")
    parser, namespace = entry_point_parser(module, args)
    assert_exact_options(parser, args, f"python -m {module}")
    return parser, namespace


def test_the_docs_have_commands_of_every_kind():
    kinds = {kind_of(command) for command in COMMANDS}
    assert kinds == {"run", "parse"}, kinds
    assert len(COMMANDS) >= 20


def _id(command: Command) -> str:
    """``run:README.md:4``, ``parse:docs/training.md:124``, ``parse-inline:...`` (written in prose)."""
    return f"{kind_of(command)}{'-inline' * command.inline}:{command.where}"


@pytest.mark.parametrize("command", COMMANDS, ids=map(_id, COMMANDS))
def test_command_flags_are_the_entry_points(command):
    parse_command(command)


# ------------------------------------------------------------------------------------------- running


def _set(args: list[str], name: str, value) -> None:
    """``--name value`` in ``args``: replaced where given, else appended."""
    flag = f"--{name}"
    for index, word in enumerate(args):
        if word == flag:
            args[index + 1] = str(value)
            return
        if word.startswith(flag + "="):
            args[index] = f"{flag}={value}"
            return
    args += [flag, str(value)]


def _get(args: list[str], name: str) -> str | None:
    flag = f"--{name}"
    for index, word in enumerate(args):
        if word == flag:
            return args[index + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def _cap(args: list[str], name: str, limit: int) -> None:
    """``--name`` at most ``limit``; set to ``limit`` when not given (the defaults are full-size)."""
    value = _get(args, name)
    _set(args, name, min(int(value), limit) if value is not None else limit)


def _shrink_model(args: list[str]) -> None:
    """A command that names its model's size gets the embedded profile's 16x16 model instead."""
    if _get(args, "image_size") is None:
        return
    _set(args, "image_size", 16)
    _set(args, "channel_mult", "1,2,2")
    _set(args, "attention_resolutions", "4")
    _cap(args, "num_channels", 32)
    _cap(args, "num_res_blocks", 1)


def small_args(module: str, args: list[str], index: int) -> list[str]:
    """``args`` at sizes that run in seconds on a CPU; ``index`` keeps each training run's log dir apart
    (the docs' runs would otherwise resume each other's state)."""
    args = [word[1:] if word.startswith(MOVED_ROOTS) else word for word in args]
    if module == "fastdiff.train":
        _shrink_model(args)
        if (_get(args, "data_dir") or "").rstrip("/").endswith("_latents"):
            for name, value in LATENT_MODEL.items():
                _set(args, name, value)
        _set(args, "max_steps", 2)
        _set(args, "log_dir", f"train_runs/{index}")
        _set(args, "num_workers", 0)
        _set(args, "sample_interval", 2)
        _set(args, "num_preview_samples", 4)
        _cap(args, "preview_steps", 10)
        _cap(args, "global_batch_size" if _get(args, "global_batch_size") else "batch_size", 4)
        if _get(args, "microbatch") is not None:
            _cap(args, "microbatch", 2)
        if _get(args, "eval_interval") is not None:
            _set(args, "eval_interval", 2)
            _set(args, "eval_samples", 4)
            _set(args, "eval_ref", 4)
        else:
            _set(args, "eval_interval", 0)
    elif module == "fastdiff.prepare_data":
        if _get(args, "image_size") is not None:
            _set(args, "image_size", 16)  # the size the docs' training commands shrink to
        _set(args, "workers", 1)
    elif module == "fastdiff.evaluate":
        if _get(args, "image_size") is not None:
            _set(args, "image_size", 16)
        _cap(args, "num_ref", 8)
        _set(args, "kid_subsets", 3)
        _cap(args, "num_samples", 4)
        _cap(args, "batch_size", 4)
    else:
        _shrink_model(args)
        _cap(args, "num_samples", 4)
        _cap(args, "batch_size", 4)
        if module == "fastdiff.sample":
            _cap(args, "grid_samples", 4)
    if module == "fastdiff.nll" or (_get(args, "timestep_respacing") or "").isdigit():
        _cap(args, "timestep_respacing", 25)  # nll: the bound sums over every step
    return args


def run_entry_point(module: str, args: list[str], env: dict[str, str]) -> str:
    """``python -m module args`` in this process (cwd is the caller's); its output, or an AssertionError
    with it when the exit status is not 0."""
    output = io.StringIO()
    code = 0
    with (
        _as_main(module, args),
        mock.patch.dict(os.environ, env),
        contextlib.redirect_stdout(output),
        contextlib.redirect_stderr(output),
    ):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code or 0
    assert code == 0, f"python -m {module} {shlex.join(args)} exited {code}:\n{output.getvalue()[-3000:]}"
    return output.getvalue()


def _write_images(folder: Path, count: int = 8, size: int = 24) -> None:
    """``count`` PNGs of two classes (``a_*``: a light square on dark, ``b_*``: the reverse)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        label = "ab"[index % 2]
        image = np.full((size, size, 3), 40 if label == "a" else 215, np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        image[top : top + size // 2, left : left + size // 2] = 255 - image[0, 0]
        Image.fromarray(image).save(folder / f"{label}_{index:04d}.png")


def _write_samples(path: Path, count: int = 4, size: int = 16) -> None:
    """``count`` uint8 images with labels, as ``fastdiff.sample`` writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(1).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    np.savez(path, images, np.arange(count, dtype=np.int64) % 4)


def _write_checkpoint_from_flags(path: Path, module: str, args: list[str]) -> None:
    """An improved-diffusion checkpoint (no run config) with fresh weights, built from the flags of the
    command that reads it (the namespace holds the flags given; the rest take their defaults)."""
    from fastdiff.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    _, namespace = entry_point_parser(module, args)
    defaults = model_and_diffusion_defaults()
    flags = {**defaults, **{name: value for name, value in vars(namespace).items() if name in defaults}}
    model, _ = create_model_and_diffusion(**flags)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A scratch directory with what the docs' commands read: image folders under data/, and the
    checkpoints of DOCUMENTED_RUNS from 2-step runs of the main job (with run_config.json beside them)."""
    root = tmp_path_factory.mktemp("docs_workspace")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for name in ("faces", "imagenet64", "train"):
            _write_images(root / "data" / name)
        if HAS_DIFFUSERS:
            from small_vae import save_small_vae

            save_small_vae(root / DOCUMENTED_VAE, seed=1)
            prepare = ["data/faces", WORKSPACE_LATENTS, "--vae", DOCUMENTED_VAE, "--image_size", "16"]
            run_entry_point("fastdiff.prepare_data", [*prepare, "--workers", "1"], {})
        for run, extra in TINY_RUNS.items():
            if run == "latent" and not HAS_DIFFUSERS:
                continue
            args = small_args("fastdiff.train", extra, 0)
            _set(args, "log_dir", run)
            run_entry_point("fastdiff.train", args, {})
        for documented, (run, kind) in DOCUMENTED_RUNS.items():
            if run == "latent" and not HAS_DIFFUSERS:
                continue
            target = root / documented
            target.parent.mkdir(parents=True, exist_ok=True)
            source = "model000002.pt" if kind == "model" else "ema_0.99_000002.pt"
            shutil.copy(root / run / source, target)
            shutil.copy(root / run / "run_config.json", target.parent / "run_config.json")
        yield root
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


RUNNABLE = [command for command in COMMANDS if kind_of(command) == "run"]


@pytest.mark.parametrize("command", RUNNABLE, ids=map(_id, RUNNABLE))
def test_command_runs_at_small_size(command, workspace, monkeypatch):
    _, module, args = split_launcher(command.argv)
    if not HAS_DIFFUSERS and ("--vae" in args or any(word.endswith("_latents") for word in args)):
        pytest.skip("latent diffusion needs diffusers (pip install 'fastdiff[diffusers]')")
    args = small_args(module, args, RUNNABLE.index(command))
    if "--help" not in args and (
        module == "fastdiff.evaluate" or _get(args, "eval_interval") not in (None, "0")
    ):
        require_inception()
    monkeypatch.chdir(workspace)
    for name in ("model_path", "samples"):
        value = _get(args, name)
        if value and value.endswith(".pt") and not (workspace / value).exists():
            _write_checkpoint_from_flags(workspace / value, module, args)
        if value and value.endswith(".npz") and not (workspace / value).exists():
            _write_samples(workspace / value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        output = run_entry_point(module, args, dict(command.env))
    finally:
        torch.set_num_threads(threads)
    if module == "fastdiff.evaluate" and "--help" not in args:
        result = json.loads(output.strip().splitlines()[-1])
        assert {"fid", "kid", "precision", "recall"} <= set(result)


# ------------------------------------------------------------------------------- python blocks, links

README_TENSORS = dict(
    x=torch.randn(2, 64, 8, 8),
    weight=torch.ones(64),
    bias=torch.zeros(64),
    q=torch.randn(2, 4, 16, 32),
    k=torch.randn(2, 4, 16, 32),
    v=torch.randn(2, 4, 16, 32),
)
"""What README's kernel block names in its text: x [N, C, *spatial], weight and bias [C], q, k, v."""

PYTHON_BLOCKS = [
    (f"{path.relative_to(ROOT).as_posix()}:{line}", code)
    for path in DOC_FILES
    for line, code in _fenced_blocks(path, "python")
]


def test_readme_shows_the_kernels_in_three_lines():
    readme = [code for where, code in PYTHON_BLOCKS if where.startswith("README.md")]
    lines = [line for line in readme[0].splitlines() if line.strip()]  # ruff's format adds a blank line
    assert len(readme) == 1 and len(lines) == 3
    assert readme[0].startswith("from fastdiff.ops import ")


@pytest.mark.parametrize("where,code", PYTHON_BLOCKS, ids=[where for where, _ in PYTHON_BLOCKS])
def test_python_example_runs(where, code):
    if "diffusers" in code:
        pytest.importorskip("diffusers")
    namespace = {"__name__": "docs_example"}
    if where.startswith("README.md"):
        namespace.update(README_TENSORS)
    exec(compile(code, where, "exec"), namespace)
    if where.startswith("README.md"):
        assert namespace["y"].shape == README_TENSORS["x"].shape
        assert namespace["out"].shape == README_TENSORS["q"].shape


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of ``path``'s headings: lower case, punctuation dropped, spaces -> hyphens."""
    prose = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    headings = re.findall(r"^#+ (.+)$", prose, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_links_stay_inside_the_repository_and_resolve():
    for path in DOC_FILES:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            assert resolved.is_relative_to(ROOT), f"{path.name}: {target} is outside the repository"
            assert resolved.exists(), f"{path.name}: {target} is missing"
            if anchor and resolved.suffix == ".md":
                assert anchor in _anchors(resolved), f"{path.name}: {target}: no such heading"


def test_readme_is_a_landing_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for guide in ("training", "sampling", "evaluation", "kernels", "benchmarks", "reproducibility",
                  "migrating", "design", "install"):  # fmt: skip
        assert f"(docs/{guide}.md)" in readme, f"README does not link docs/{guide}.md"


def test_readme_opens_with_the_two_commands_ci_runs():
    first_block = _fenced_blocks(ROOT / "README.md", "bash")[0][1].strip().splitlines()
    assert len(first_block) == 2
    assert first_block[0].endswith("python -m fastdiff.train")
    ci = (ROOT / ".ci" / "run").read_text()
    setup = re.search(r"^SETUP='(.*)'$", ci, flags=re.M).group(1)
    tests = re.search(r"^TESTS='(.*)'$", ci, flags=re.M).group(1)
    assert first_block[1] == f"{setup} && {tests}"
    assert first_block[0].startswith(setup)
