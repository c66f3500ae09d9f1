"""Bundles of config sections: what one command runs with, its flags, and the run config file.

A bundle is a frozen dataclass whose fields are sections, each placed on the command line by a
:class:`Placement` (a flag prefix, renamed flags, the fields shown, command-specific defaults). The bundle
maps flat flags (``{"lr": 1e-4, "preview_steps": 25}``, improved-diffusion's style) to sections and back,
and :class:`RunConfig` (what ``fastdiff.train`` runs with) round-trips through ``run_config.json``.
"""

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from fastdiff.config.fields import ConfigError, Section
from fastdiff.config.sections import (
    DiffusionConfig,
    EvalConfig,
    EvaluateConfig,
    LatentsConfig,
    ModelConfig,
    MomentsConfig,
    NllConfig,
    PrepareDataConfig,
    RuntimeConfig,
    SampleConfig,
    SamplingConfig,
    SelftestConfig,
    TrainConfig,
)

RUN_CONFIG_FILENAME = "run_config.json"
LEGACY_FLAGS_FILENAME = "model_flags.json"
RUN_CONFIG_FORMAT = "fastdiff-run-config"
RUN_CONFIG_VERSION = 6
FIELDS_ADDED = {
    "model.in_channels": 2,
    "preview.solver_order": 3,
    "preview.unipc_variant": 3,
    "preview.sigma_max": 3,
    "preview.sigma_min": 5,
    "preview.ode_start": 6,
}
"""Fields a run config gained after version 1, with the version that added them: a file of an earlier
version lacks them and they take their defaults (version 1 files are RGB models, ``in_channels`` 3;
versions 1 and 2 predate the preview's solver flags of issue 21, 1 to 5 its Gaussian start)."""
SECTIONS_ADDED = {"latents": 4}
"""Sections a run config gained after version 1, with the version that added them: a file of an earlier
version lacks them and they take their defaults (versions 1 to 3 are models of pixels: no latent info)."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """How one section's fields appear as flags: ``prefix`` + field name, or ``rename[field]``; only the
    fields in ``only`` (all when None); ``defaults`` override the section's own for this command."""

    prefix: str = ""
    rename: Mapping[str, str] = dataclasses.field(default_factory=dict)
    only: tuple[str, ...] | None = None
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    positional: tuple[str, ...] = ()
    """Fields given as positional arguments (in this order) instead of ``--flag`` options."""

    def flag(self, field: str) -> str:
        return self.rename.get(field, self.prefix + field)

    def fields(self, section: type[Section]) -> tuple[str, ...]:
        return self.only if self.only is not None else section.field_names()


def section(kind: type[Section], **placement: Any) -> Any:
    """A bundle field holding a ``kind`` section placed as ``Placement(**placement)``."""
    where = Placement(**placement)
    return dataclasses.field(
        default_factory=lambda: kind(**where.defaults), metadata={"section": kind, "placement": where}
    )


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """One command-line flag: where its value lives and how it is documented."""

    flag: str
    section: str
    field: str
    kind: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    parse: Any = None
    """The field's parser (its flag reads a string), or None."""
    positional: bool = False
    """Given as a positional argument, not a ``--flag``."""


@dataclasses.dataclass(frozen=True)
class Bundle:
    """Base of the bundles: sections by name, their flags, and flat-flag conversion."""

    @classmethod
    def sections(cls) -> list[tuple[str, type[Section], Placement]]:
        return [
            (spec.name, spec.metadata["section"], spec.metadata["placement"])
            for spec in dataclasses.fields(cls)
            if "section" in spec.metadata
        ]

    @classmethod
    def flag_specs(cls) -> dict[str, FlagSpec]:
        """Every flag of this bundle, in section order; a flag name appears once."""
        specs: dict[str, FlagSpec] = {}
        for name, kind, where in cls.sections():
            defaults = {**kind.defaults(), **where.defaults}
            for field in where.fields(kind):
                flag = where.flag(field)
                if flag in specs:
                    raise TypeError(f"{cls.__name__}: flag --{flag} is placed twice")
                spec = kind.__dataclass_fields__[field]
                specs[flag] = FlagSpec(
                    flag,
                    name,
                    field,
                    spec.type,
                    defaults[field],
                    spec.metadata["help"],
                    spec.metadata["choices"],
                    spec.metadata.get("parse"),
                    field in where.positional,
                )
        return specs

    @classmethod
    def flag_of(cls, section_name: str, field: str) -> str:
        """The flag that sets ``section_name.field`` (its dotted name when no flag does)."""
        for name, _, where in cls.sections():
            if name == section_name:
                return where.flag(field)
        return f"{section_name}.{field}"

    def with_flags(self, values: Mapping[str, Any], source: str = "") -> "Bundle":
        """A copy with the flat ``values`` (flag name -> value) set; a ConfigError names the flag (and
        ``source``, when the values come from a file) for an unknown flag or a value that fails its check."""
        specs = self.flag_specs()
        per_section: dict[str, dict[str, Any]] = {}
        where = f" in {source}" if source else ""
        for flag, value in values.items():
            spec = specs.get(flag)
            if spec is None:
                raise ConfigError(f"--{flag}", f"is not a flag of this command{where}")
            per_section.setdefault(spec.section, {})[spec.field] = value
        replaced = {}
        for name, fields in per_section.items():
            try:
                replaced[name] = dataclasses.replace(getattr(self, name), **fields)
            except ConfigError as error:
                flag = self.flag_of(name, error.field) if error.field else ""
                raise ConfigError(f"--{flag}" if flag else "", f"{error.problem}{where}") from None
        return dataclasses.replace(self, **replaced)


@dataclasses.dataclass(frozen=True)
class RunConfig(Bundle):
    """What ``fastdiff.train`` runs with; saved as ``run_config.json`` in the run's log dir and in every
    full training state, and read by ``fastdiff.sample``, ``nll`` and ``evaluate`` beside a checkpoint."""

    model: ModelConfig = section(ModelConfig)
    diffusion: DiffusionConfig = section(DiffusionConfig)
    train: TrainConfig = section(TrainConfig)
    runtime: RuntimeConfig = section(RuntimeConfig)
    preview: SamplingConfig = section(
        SamplingConfig,
        prefix="preview_",
        rename={"use_ddim": "preview_ddim"},
        only=("sampler", "steps", "timestep_spacing", "guidance_scale", "use_ddim"),
        defaults={"sampler": "unipc", "steps": 20, "use_ddim": True},
    )
    evaluation: EvalConfig = section(EvalConfig)
    latents: LatentsConfig = section(LatentsConfig, only=("vae",))
    class_names: tuple[str, ...] = ()

    def model_flags(self) -> dict[str, Any]:
        """improved-diffusion's flat model and diffusion flags (``model_and_diffusion_defaults()`` keys)."""
        return {**self.model.to_dict(), **self.diffusion.to_dict()}

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": RUN_CONFIG_FORMAT, "version": RUN_CONFIG_VERSION}
        data.update({name: getattr(self, name).to_dict() for name, _, _ in self.sections()})
        data["class_names"] = list(self.class_names)
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "RunConfig":
        """A run config from any file fastdiff or improved-diffusion wrote (see :func:`load_run_config`)."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if "format" not in data:
            return _from_legacy(data, source)
        if data["format"] != RUN_CONFIG_FORMAT:
            raise ValueError(f"{source}: format {data['format']!r} is not {RUN_CONFIG_FORMAT!r}")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"{source}: field 'version' must be a positive integer, got {version!r}")
        if version > RUN_CONFIG_VERSION:
            raise ValueError(
                f"{source}: run config format version {version} is newer than this fastdiff reads "
                f"({RUN_CONFIG_VERSION}): use the fastdiff that wrote it, or a newer one"
            )
        expected = {"format", "version", "class_names", *(name for name, _, _ in cls.sections())}
        unknown = sorted(set(data) - expected)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {', '.join(unknown)} (expected {sorted(expected)})")
        sections = {}
        for name, kind, _ in cls.sections():
            if name not in data and SECTIONS_ADDED.get(name, 1) > version:
                sections[name] = kind()
                continue
            if name not in data:
                raise ValueError(f"{source}: missing field '{name}'")
            sections[name] = _section_from_dict(kind, data[name], name, source, version)
        names = data.get("class_names", [])
        if not isinstance(names, list) or not all(isinstance(item, str) for item in names):
            raise ValueError(f"{source}: field 'class_names' must be a list of strings")
        return cls(**sections, class_names=tuple(names))


def _section_from_dict(
    kind: type[Section], values: Any, name: str, source: str, version: int = RUN_CONFIG_VERSION
) -> Section:
    """A section from its JSON object; every field the file's ``version`` had must be present (later ones,
    :data:`FIELDS_ADDED`, take their defaults), none unknown, each must pass."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: field '{name}' must be an object, got {type(values).__name__}")
    fields = set(kind.field_names())
    expected = {field for field in fields if FIELDS_ADDED.get(f"{name}.{field}", 1) <= version}
    unknown, missing = sorted(set(values) - fields), sorted(expected - set(values))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {', '.join(f'{name}.{f}' for f in unknown)}")
    if missing:
        raise ValueError(f"{source}: missing field(s) {', '.join(f'{name}.{f}' for f in missing)}")
    try:
        return kind(**values)  # each field is coerced (or parsed) and checked on creation
    except ConfigError as error:
        raise ValueError(f"{source}: field '{name}.{error.field}' {error.problem}") from None


def _from_legacy(data: dict, source: str) -> RunConfig:
    """An earlier fastdiff's ``model_flags.json`` (``{"model_and_diffusion": {...}, "class_names": [...]}``)
    or a flat dict of improved-diffusion's model and diffusion flags; flags it lacks keep their defaults."""
    flags = data.get("model_and_diffusion", data)
    names = data.get("class_names", []) if "model_and_diffusion" in data else []
    if not isinstance(flags, dict):
        raise ValueError(f"{source}: 'model_and_diffusion' must be an object")
    known = set(ModelConfig.field_names()) | set(DiffusionConfig.field_names())
    unknown = sorted(set(flags) - known)
    if unknown:
        raise ValueError(f"{source}: unknown model or diffusion flag(s) {', '.join(unknown)}")
    try:
        config = RunConfig().with_flags(flags, source)
    except ConfigError as error:
        raise ValueError(f"{source}: {error}") from None
    return dataclasses.replace(config, class_names=tuple(str(name) for name in names))


def load_run_config(path: str) -> RunConfig:
    """Read ``path``: a ``run_config.json``, an earlier fastdiff's ``model_flags.json``, or a JSON object of
    improved-diffusion's model and diffusion flags. ValueError names the file and the field."""
    try:
        with open(path) as handle:
            data = json.load(handle)
    except OSError as error:
        raise ValueError(f"cannot read the run config {path!r}: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    return RunConfig.from_dict(data, path)


def write_run_config(config: RunConfig, directory: str) -> str:
    """Write ``run_config.json`` into ``directory`` atomically; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, RUN_CONFIG_FILENAME)
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(config.to_dict(), handle, indent=2)
        handle.write("\n")
    os.replace(temporary, path)
    return path


def find_run_config(model_path: str) -> str | None:
    """The run config beside ``model_path``: ``run_config.json``, else an earlier ``model_flags.json``."""
    directory = os.path.dirname(os.path.abspath(model_path))
    for name in (RUN_CONFIG_FILENAME, LEGACY_FLAGS_FILENAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


INFERENCE_RUNTIME = dict(only=("seed", "precision", "kernels", "device", "trust_checkpoint"),
                         defaults={"precision": "fp32"})  # fmt: skip
"""The runtime flags of sample, nll and evaluate (fp32 by default, so results compare across machines)."""


@dataclasses.dataclass(frozen=True)
class SampleCommand(Bundle):
    """What ``fastdiff.sample`` runs with."""

    sample: SampleConfig = section(SampleConfig)
    sampling: SamplingConfig = section(SamplingConfig)
    runtime: RuntimeConfig = section(RuntimeConfig, **INFERENCE_RUNTIME)
    model: ModelConfig = section(ModelConfig)
    diffusion: DiffusionConfig = section(DiffusionConfig)
    latents: LatentsConfig = section(LatentsConfig, only=("vae",))


@dataclasses.dataclass(frozen=True)
class NllCommand(Bundle):
    """What ``fastdiff.nll`` runs with."""

    nll: NllConfig = section(NllConfig)
    sampling: SamplingConfig = section(SamplingConfig, only=("clip_denoised",))
    runtime: RuntimeConfig = section(RuntimeConfig, **INFERENCE_RUNTIME)
    model: ModelConfig = section(ModelConfig)
    diffusion: DiffusionConfig = section(DiffusionConfig)


@dataclasses.dataclass(frozen=True)
class EvaluateCommand(Bundle):
    """What ``fastdiff.evaluate`` runs with: a checkpoint given as SAMPLES is sampled as fastdiff.sample
    does, with its flags."""

    evaluate: EvaluateConfig = section(EvaluateConfig)
    evaluation: EvalConfig = section(EvalConfig, only=("inception",))
    sample: SampleConfig = section(SampleConfig)
    sampling: SamplingConfig = section(SamplingConfig)
    runtime: RuntimeConfig = section(RuntimeConfig, **INFERENCE_RUNTIME)
    model: ModelConfig = section(ModelConfig)
    diffusion: DiffusionConfig = section(DiffusionConfig)
    latents: LatentsConfig = section(LatentsConfig, only=("vae",))


def with_saved_model(config: Bundle, saved: RunConfig, given: set[str]) -> tuple[Bundle, list[str]]:
    """``config`` with the model and diffusion flags not in ``given`` taken from ``saved``; returns it and
    the names taken."""
    taken = {flag: value for flag, value in saved.model_flags().items() if flag not in given}
    return config.with_flags(taken), list(taken)


@dataclasses.dataclass(frozen=True)
class MomentsCommand(Bundle):
    """What ``fastdiff.measure_moments`` runs with."""

    moments: MomentsConfig = section(MomentsConfig)


@dataclasses.dataclass(frozen=True)
class SelftestCommand(Bundle):
    """What ``fastdiff.selftest`` runs with."""

    selftest: SelftestConfig = section(SelftestConfig)


@dataclasses.dataclass(frozen=True)
class PrepareDataCommand(Bundle):
    """What ``fastdiff.prepare_data`` runs with: SOURCE and OUT are positional."""

    prepare: PrepareDataConfig = section(PrepareDataConfig, positional=("source", "out"))
    model: ModelConfig = section(ModelConfig, only=("image_size", "in_channels", "class_cond"))
    latents: LatentsConfig = section(LatentsConfig, only=("vae",))
    runtime: RuntimeConfig = section(RuntimeConfig, only=("device",))
