"""Typed configs: the run config file, its bad input, where flag values come from, and one diffusion for
every path (training, previews, in-training evaluation, sample, nll, evaluate)."""

import dataclasses
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import TINY_MODEL_FLAGS, TINY_RUN_ARGV, as_argv, one_thread  # noqa: F401 (one_thread: autouse)

from fastdiff import evaluate, nll, sample, train
from fastdiff.builders import build_diffusion, build_model
from fastdiff.config import (
    RUN_CONFIG_VERSION,
    ConfigError,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    load_run_config,
    write_run_config,
)
from fastdiff.config.bundles import FIELDS_ADDED
from fastdiff.runtime.generate import sample_from_noise
from fastdiff.runtime.image_grid import save_image_grid
from fastdiff.runtime.inference import prepare_inference
from fastdiff.script_util import model_and_diffusion_defaults

CPU = type("Context", (), {"rank": 0, "world_size": 1, "is_main": False, "device": torch.device("cpu")})()


# ---------------------------------------------------------------------------- the run config file


def test_run_config_round_trips_through_json(tmp_path):
    config = RunConfig().with_flags({"lr": 3e-4, "predict_v": True, "preview_sampler": "dpmpp_2m", "seed": 7})
    config = dataclasses.replace(config, class_names=("a", "b"))
    path = write_run_config(config, str(tmp_path))
    assert load_run_config(path) == config
    with open(path) as handle:
        data = json.load(handle)
    assert data["format"] == "fastdiff-run-config" and data["version"] == RUN_CONFIG_VERSION
    assert data["train"]["lr"] == 3e-4 and data["preview"]["sampler"] == "dpmpp_2m"


def test_model_and_diffusion_defaults_are_the_config_fields():
    assert model_and_diffusion_defaults() == RunConfig().model_flags()
    assert set(model_and_diffusion_defaults()) == set(ModelConfig.field_names()) | set(
        DiffusionConfig.field_names()
    )


def test_earlier_files_load(tmp_path):
    legacy = tmp_path / "model_flags.json"
    legacy.write_text(
        json.dumps({"model_and_diffusion": {"image_size": 32, "learn_sigma": True}, "class_names": ["x"]})
    )
    config = load_run_config(str(legacy))
    assert config.model.image_size == 32 and config.diffusion.learn_sigma and config.class_names == ("x",)
    assert config.model.num_channels == 128, "flags an earlier file lacks keep their defaults"
    improved = tmp_path / "flags.json"
    improved.write_text(json.dumps({**model_and_diffusion_defaults(), "noise_schedule": "cosine"}))
    assert load_run_config(str(improved)).diffusion.noise_schedule == "cosine"


def _written(tmp_path, edit) -> str:
    data = RunConfig().to_dict()
    edit(data)
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("version", [1, 2])
def test_an_earlier_run_config_takes_the_defaults_of_the_preview_solver_fields(tmp_path, version):
    """Version 3 added the preview's solver_order, unipc_variant and sigma_max (issue 21)."""

    def as_earlier(data):
        data["version"] = version
        del data["latents"]  # added by version 4
        for field in ("solver_order", "unipc_variant", "sigma_max", "sigma_min", "ode_start"):
            del data["preview"][field]

    config = load_run_config(_written(tmp_path, as_earlier))
    assert config.preview == RunConfig().preview and config.latents.info is None
    with pytest.raises(ValueError, match=r"missing field\(s\) preview\.sigma_max"):
        load_run_config(_written(tmp_path, lambda d: d["preview"].pop("sigma_max")))


@pytest.mark.parametrize(
    ("version", "field", "default"),
    [(4, "sigma_min", 0.0), (5, "ode_start", "auto")],
)
def test_a_run_config_takes_the_default_of_a_preview_field_its_version_predates(
    tmp_path, version, field, default
):
    """Version 5 added the preview's sigma_min (the capped grids' end), version 6 its ode_start (the
    Gaussian start): an earlier file lacks them and takes the default; a file of today's version must
    have them."""

    def as_earlier(data):
        data["version"] = version
        for name, added in FIELDS_ADDED.items():
            section, _, key = name.partition(".")
            if added > version:
                del data[section][key]

    assert getattr(load_run_config(_written(tmp_path, as_earlier)).preview, field) == default
    with pytest.raises(ValueError, match=rf"missing field\(s\) preview\.{field}"):
        load_run_config(_written(tmp_path, lambda d: d["preview"].pop(field)))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d.update(version=RUN_CONFIG_VERSION + 1),
            f"format version {RUN_CONFIG_VERSION + 1} is newer than this fastdiff",
        ),
        (lambda d: d.pop("latents"), "missing field 'latents'"),
        (lambda d: d["latents"].update(info={"format": "x"}), "'latents.info'.*field 'format'"),
        (lambda d: d["train"].update(learning_rate=1.0), r"unknown field\(s\) train\.learning_rate"),
        (lambda d: d["model"].pop("num_channels"), r"missing field\(s\) model\.num_channels"),
        (lambda d: d.pop("diffusion"), "missing field 'diffusion'"),
        (lambda d: d.update(extra={}), r"unknown field\(s\) extra"),
        (lambda d: d["train"].update(lr=-1.0), "field 'train.lr' must be positive"),
        (lambda d: d["train"].update(batch_size="4"), "field 'train.batch_size' must be int"),
        (lambda d: d["diffusion"].update(predict_v=True, predict_xstart=True), "'diffusion.predict_v'"),
        (lambda d: d["model"].update(channel_mult="1,x"), "'model.channel_mult'"),
    ],
)
def test_bad_run_config_files_name_the_field_and_the_file(tmp_path, edit, message):
    path = _written(tmp_path, edit)
    with pytest.raises(ValueError, match=message) as caught:
        load_run_config(path)
    assert path in str(caught.value)


def test_unreadable_run_config_files(tmp_path):
    (tmp_path / "run_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_run_config(str(tmp_path / "run_config.json"))
    with pytest.raises(ValueError, match="cannot read the run config"):
        load_run_config(str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match=r"--config: .* not a flag|unknown model or diffusion flag"):
        (tmp_path / "flags.json").write_text(json.dumps({"lr": 1.0}))
        load_run_config(str(tmp_path / "flags.json"))


# ---------------------------------------------------------------------------- where values come from


def test_command_line_checks_name_the_flag():
    with pytest.raises(ValueError, match="--lr must be positive"):
        train.parse_args(["--lr", "0"])
    with pytest.raises(ValueError, match="--preview_sampler must be one of"):
        train.parse_args(["--preview_sampler", "plms"])
    with pytest.raises(ValueError, match="--noise_schedule must be one of"):
        sample.parse_args(["--noise_schedule", "sigmoid"])
    with pytest.raises(ValueError, match="--use_ddim True asks for DDIM"):
        sample.parse_args(["--use_ddim", "True", "--sampler", "heun"])


def test_a_flag_given_twice_takes_its_last_value():
    config, given = train.parse_args(["--lr", "0.1", "--lr", "0.2"])
    assert config.train.lr == 0.2 and "lr" in given


def test_the_command_line_overrides_a_config_file_which_overrides_the_preset(tmp_path):
    saved = RunConfig().with_flags({"image_size": 32, "lr": 0.5, "max_steps": 9, "channel_mult": "1,2"})
    path = write_run_config(saved, str(tmp_path))
    config, given = train.parse_args(["--config", path, "--lr", "0.25"])
    assert config.train.lr == 0.25, "the command line wins over the file"
    assert config.train.max_steps == 9 and config.model.image_size == 32, "the file wins over defaults"
    assert config.train.batch_size == 1, "no embedded profile under --config"
    assert given == {"lr"}
    with pytest.raises(ValueError, match="cannot read the run config"):
        train.parse_args(["--config", str(tmp_path / "absent.json")])


def test_inference_takes_model_flags_from_the_run_and_the_command_line_wins(tmp_path):
    run = RunConfig().with_flags({**TINY_MODEL_FLAGS, "learn_sigma": True, "noise_schedule": "cosine"})
    write_run_config(run, str(tmp_path))
    model = build_model(run.model, run.diffusion)
    torch.save(model.state_dict(), tmp_path / "ema_0.9999_000001.pt")
    path = str(tmp_path / "ema_0.9999_000001.pt")
    config, given = sample.parse_args(["--model_path", path, "--diffusion_steps", "40"])
    setup = prepare_inference(config, given, path, CPU)
    assert setup.config.diffusion.noise_schedule == "cosine" and setup.config.diffusion.learn_sigma
    assert setup.config.diffusion.diffusion_steps == 40 and setup.diffusion.num_timesteps == 40


# ---------------------------------------------------------------------------- one diffusion for every path

OBJECTIVES = [
    dict(),
    dict(predict_xstart=True),
    dict(predict_v=True),
    dict(predict_v=True, rescale_zero_terminal_snr=True),
    dict(predict_xstart=True, rescale_zero_terminal_snr=True),
]
VARIANCE = [dict(), dict(learn_sigma=True), dict(sigma_small=True), dict(learn_sigma=True, use_kl=True)]
SCHEDULE = [
    dict(noise_schedule="linear"),
    dict(noise_schedule="cosine", rescale_timesteps=False),
    dict(noise_schedule="cosine", snr_gamma=5.0, rescale_learned_sigmas=False),
]
COMBINATIONS = [{**a, **b, **c} for a, b, c in itertools.product(OBJECTIVES, VARIANCE, SCHEDULE)]


def assert_same_process(spaced, full) -> None:
    """``spaced`` is ``full`` (every trained step) restricted to its timestep_map, every field alike."""
    for name in ("model_mean_type", "model_var_type", "loss_type", "rescale_timesteps", "snr_gamma"):
        assert getattr(spaced, name) == getattr(full, name), name
    assert spaced.original_num_steps == full.num_timesteps
    steps = np.asarray(spaced.timestep_map)
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[steps], rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "flags", COMBINATIONS, ids=lambda flags: ",".join(f"{k}={v}" for k, v in flags.items())
)
def test_every_path_builds_the_same_diffusion(tmp_path, flags):
    argv = [*TINY_RUN_ARGV, *as_argv(flags), "--preview_steps", "10", "--log_dir", str(tmp_path)]
    config, _ = train.parse_args([*argv, "--preview_sampler", "ddim"])
    model = build_model(config.model, config.diffusion)
    training = build_diffusion(config.diffusion)
    previews = train.build_previews(config, model)
    write_run_config(config, str(tmp_path))
    path = str(tmp_path / "ema_0.9999_000001.pt")
    torch.save(model.state_dict(), path)
    respaced = ["--timestep_respacing", "ddim10"]
    sampled = sample.prepare(*sample.parse_args(["--model_path", path, *respaced]), path, CPU)
    scored = prepare_inference(*nll.parse_args(["--model_path", path]), path, CPU)
    evaluated = sample.prepare(
        *evaluate.parse_args(["--samples", path, "--ref", "shapes", *respaced]), path, CPU
    )
    assert_same_process(training, training)
    for diffusion in (previews[0], sampled.diffusion, scored.diffusion, evaluated.diffusion):
        assert_same_process(diffusion, training)
    assert previews[0].num_timesteps == sampled.diffusion.num_timesteps == 10
    for same_steps in (sampled.diffusion, evaluated.diffusion):  # respaced alike: identical
        np.testing.assert_array_equal(same_steps.betas, previews[0].betas)
    np.testing.assert_array_equal(scored.diffusion.betas, training.betas)
    if flags.get("rescale_zero_terminal_snr"):
        assert training.alphas_cumprod[-1] == 0


def test_previews_default_to_unipc_on_the_training_diffusion(tmp_path):
    """An ODE sampler's previews take --preview_steps grid points over the whole training diffusion (the
    capped grid needs its noise levels); ddpm and ddim run a respaced copy (above)."""
    config, _ = train.parse_args([*TINY_RUN_ARGV, "--preview_steps", "12", "--log_dir", str(tmp_path)])
    model = build_model(config.model, config.diffusion)
    diffusion, options = train.build_previews(config, model)
    assert config.preview.sampler == "unipc" and options["sampler"] == "unipc" and options["steps"] == 12
    assert diffusion.num_timesteps == config.diffusion.diffusion_steps
    embedded, _ = train.parse_args([])
    assert (embedded.preview.sampler, embedded.preview.steps) == ("unipc", 20)
    with pytest.raises(ValueError, match="--preview_solver_order"):
        bad, _ = train.parse_args([*TINY_RUN_ARGV, "--log_dir", str(tmp_path), "--preview_steps", "2"])
        bad = dataclasses.replace(bad, preview=dataclasses.replace(bad.preview, solver_order=3))
        train.build_previews(bad, model)


def test_a_v_prediction_runs_grid_is_what_fastdiff_sample_draws(tmp_path, monkeypatch):
    """The grid of a --predict_v --rescale_zero_terminal_snr run equals fastdiff.sample's samples from the
    same EMA weights with the same sampler (the default previews': unipc) and starting noise."""
    from fastdiff.training.preview import SamplePreview

    previews = []
    original_write = SamplePreview.write

    def keep(self, *args):
        previews.append(self)
        return original_write(self, *args)

    monkeypatch.setattr(SamplePreview, "write", keep)
    objective = ["--predict_v", "True", "--rescale_zero_terminal_snr", "True", "--class_cond", "True"]
    grid = ["--sample_interval", "2", "--num_preview_samples", "4", "--preview_steps", "10"]
    run = ["--max_steps", "2", "--save_interval", "2", "--batch_size", "4", "--num_workers", "0"]
    assert train.main([*TINY_RUN_ARGV, *objective, *grid, *run, "--log_dir", str(tmp_path)]) == 0
    (preview,) = previews
    assert preview.diffusion.model_mean_type.name == "VELOCITY"

    path = str(tmp_path / "ema_0.9999_000002.pt")
    config, given = sample.parse_args(["--model_path", path, "--sampler", "unipc", "--steps", "10"])
    setup = sample.prepare(config, given, path, CPU)
    images = sample_from_noise(
        setup.model, setup.diffusion, preview.noise, preview.labels,
        {**config.sampling.options(), "data_moments": setup.data_moments}, setup.precision, seed=0,
        batch_size=4,
    )  # fmt: skip
    save_image_grid(images.numpy(), str(tmp_path / "from_sample.png"))
    with Image.open(tmp_path / "samples_000002.png") as a, Image.open(tmp_path / "from_sample.png") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert images.float().std() > 0


def test_config_errors_carry_the_field():
    with pytest.raises(ConfigError) as caught:
        ModelConfig(class_dropout_prob=0.1)
    assert caught.value.field == "class_dropout_prob" and "class_cond" in str(caught.value)


def test_inference_imports_nothing_from_training():
    code = (
        "import sys, fastdiff.sample, fastdiff.nll, fastdiff.evaluate; "
        "print([name for name in sys.modules if name.startswith('fastdiff.training')])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", [train, sample, nll, evaluate])
def test_every_entry_point_documents_each_flag_with_its_default(module, capsys):
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = capsys.readouterr().out
    assert "(default: " in text and "flags:" in text
    assert "--image_size SIZE" in text and "--in_channels INT" in text and "--diffusion_steps INT" in text


def test_evaluate_accepts_the_sample_flags_it_ignores_with_a_note(capsys):
    config, given = evaluate.parse_args(["--ref", "shapes", "--samples", "s.npz", "--grid_samples", "4"])
    assert "grid_samples" in given and config.sample.grid_samples == 4
    assert "note: --grid_samples is ignored by fastdiff.evaluate" in capsys.readouterr().err
