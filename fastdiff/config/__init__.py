"""Typed configs, built once: sections (model, diffusion, sampling, training, evaluation, runtime and each
command's own), the bundles each command runs with, and the run config file.

Every flag is one field of one section, holding its default, help text and checks; the command line
(``fastdiff.cli``), ``run_config.json`` and improved-diffusion's flag dicts (``fastdiff.script_util``) are
views of the same fields.
"""

from fastdiff.config.bundles import (
    LEGACY_FLAGS_FILENAME,
    RUN_CONFIG_FILENAME,
    RUN_CONFIG_FORMAT,
    RUN_CONFIG_VERSION,
    Bundle,
    EvaluateCommand,
    NllCommand,
    Placement,
    PrepareDataCommand,
    RunConfig,
    SampleCommand,
    SelftestCommand,
    find_run_config,
    load_run_config,
    with_saved_model,
    write_run_config,
)
from fastdiff.config.fields import ConfigError, Section, option
from fastdiff.config.sections import (
    OPTIMIZERS,
    DiffusionConfig,
    EvalConfig,
    EvaluateConfig,
    ModelConfig,
    NllConfig,
    PrepareDataConfig,
    RuntimeConfig,
    SampleConfig,
    SamplingConfig,
    SelftestConfig,
    TrainConfig,
    parse_attention_resolutions,
    parse_channel_mult,
    parse_ema_rates,
    parse_image_size,
)

__all__ = [
    "LEGACY_FLAGS_FILENAME",
    "OPTIMIZERS",
    "RUN_CONFIG_FILENAME",
    "RUN_CONFIG_FORMAT",
    "RUN_CONFIG_VERSION",
    "Bundle",
    "ConfigError",
    "DiffusionConfig",
    "EvalConfig",
    "EvaluateCommand",
    "EvaluateConfig",
    "ModelConfig",
    "NllCommand",
    "NllConfig",
    "Placement",
    "PrepareDataCommand",
    "PrepareDataConfig",
    "RunConfig",
    "RuntimeConfig",
    "SampleCommand",
    "SampleConfig",
    "SamplingConfig",
    "Section",
    "SelftestCommand",
    "SelftestConfig",
    "TrainConfig",
    "find_run_config",
    "load_run_config",
    "option",
    "parse_attention_resolutions",
    "parse_channel_mult",
    "parse_ema_rates",
    "parse_image_size",
    "with_saved_model",
    "write_run_config",
]
