"""fastdiff.script_util: improved-diffusion's flags, defaults, factory rules and argparse conventions."""

import argparse
import inspect
import subprocess
import sys

import pytest

import fastdiff
from fastdiff import script_util
from fastdiff.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    parse_attention_resolutions,
    parse_channel_mult,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
    str2bool,
)
from fastdiff.unet import SuperResModel, UNetModel

IMPROVED_DEFAULTS = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    attention_resolutions="16,8",
    dropout=0.0,
    learn_sigma=False,
    sigma_small=False,
    class_cond=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=True,
    rescale_learned_sigmas=True,
    use_checkpoint=False,
    use_scale_shift_norm=True,
)
GUIDED_OPTIONS = dict(
    num_head_channels=-1, channel_mult="", resblock_updown=False, use_new_attention_order=False
)
FASTDIFF_OPTIONS = dict(
    in_channels=3, class_dropout_prob=0.0, predict_v=False, snr_gamma=0.0, rescale_zero_terminal_snr=False
)


def test_defaults_are_improved_diffusion_plus_guided_options():
    assert model_and_diffusion_defaults() == {**IMPROVED_DEFAULTS, **GUIDED_OPTIONS, **FASTDIFF_OPTIONS}
    assert set(script_util.FASTDIFF_OPTIONS) == set(FASTDIFF_OPTIONS)
    defaults = model_and_diffusion_defaults()
    defaults["image_size"] = 1
    assert model_and_diffusion_defaults()["image_size"] == 64  # a fresh dict each call


def test_factory_signatures_default_to_the_flag_defaults():
    defaults = model_and_diffusion_defaults()
    parameters = inspect.signature(create_model_and_diffusion).parameters
    assert set(parameters) == set(defaults)
    assert {name: p.default for name, p in parameters.items()} == defaults
    for name, p in inspect.signature(create_model).parameters.items():
        if p.default is not inspect.Parameter.empty:
            assert p.default == defaults[name], name
    sr = sr_model_and_diffusion_defaults()
    assert set(inspect.signature(sr_create_model_and_diffusion).parameters) == set(sr)
    assert "image_size" not in sr and (sr["large_size"], sr["small_size"]) == (256, 64)


def test_package_exports():
    assert fastdiff.UNetModel is UNetModel
    assert fastdiff.model_and_diffusion_defaults is model_and_diffusion_defaults
    assert fastdiff.create_model_and_diffusion is create_model_and_diffusion
    with pytest.raises(AttributeError):
        _ = fastdiff.no_such_name


def test_import_fastdiff_is_cheap():
    code = (
        "import sys, fastdiff; assert 'torch' not in sys.modules, 'torch'; "
        "fastdiff.UNetModel; assert 'triton' not in sys.modules, 'triton'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def parse(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, model_and_diffusion_defaults())
    return args_to_dict(parser.parse_args(argv), model_and_diffusion_defaults().keys())


def test_flags_round_trip_into_model_and_diffusion():
    argv = "--image_size 32 --learn_sigma True --num_channels 32 --num_res_blocks 1 --dropout 0.1"
    flags = parse([*argv.split(), "--timestep_respacing", "ddim10", "--class_cond", "yes"])
    assert flags == {
        **model_and_diffusion_defaults(),
        "image_size": 32,
        "learn_sigma": True,
        "num_channels": 32,
        "num_res_blocks": 1,
        "dropout": 0.1,
        "timestep_respacing": "ddim10",
        "class_cond": True,
    }
    assert parse([]) == model_and_diffusion_defaults()
    model, diffusion = create_model_and_diffusion(**flags)
    assert isinstance(model, UNetModel)
    assert model.out_channels == 6 and model.num_classes == 1000
    assert model.channel_mult == (1, 2, 2, 2) and model.attention_resolutions == (2, 4)
    assert model.dropout == 0.1 and model.num_heads == 4
    assert diffusion.num_timesteps == 10 and diffusion.rescale_timesteps


@pytest.mark.parametrize(
    ("text", "value"),
    [
        *((t, True) for t in ("yes", "True", "t", "Y", "1")),
        *((f, False) for f in ("no", "FALSE", "f", "n", "0")),
    ],
)
def test_str2bool_accepts_reference_spellings(text, value):
    assert str2bool(text) is value
    assert parse(["--use_kl", text])["use_kl"] is value


def test_str2bool_rejects_other_text():
    with pytest.raises(argparse.ArgumentTypeError, match="boolean"):
        str2bool("maybe")
    with pytest.raises(SystemExit):
        parse(["--learn_sigma", "maybe"])
    assert str2bool(True) is True


def test_add_dict_to_argparser_types():
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, dict(count=3, rate=0.5, name="a", path=None, flag=False))
    args = parser.parse_args(["--count", "7", "--rate", "2", "--path", "x", "--flag", "t"])
    assert args_to_dict(args, ["count", "rate", "name", "path", "flag"]) == dict(
        count=7, rate=2.0, name="a", path="x", flag=True
    )
    assert isinstance(args.rate, float)


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [(256, (1, 1, 2, 2, 4, 4)), (64, (1, 2, 3, 4)), (32, (1, 2, 2, 2)), (128, (1, 1, 2, 3, 4))],
)
def test_channel_mult_defaults_by_image_size(image_size, expected):
    assert parse_channel_mult("", image_size) == expected


def test_channel_mult_parsing_and_errors():
    assert parse_channel_mult("1,2,2", 48) == (1, 2, 2)
    assert parse_channel_mult("0.5,1", 64) == (0.5, 1)
    assert parse_channel_mult((1, 3), 64) == (1, 3)
    with pytest.raises(ValueError, match=r"image_size=48.*channel_mult"):
        parse_channel_mult("", 48)
    with pytest.raises(ValueError, match="channel_mult"):
        parse_channel_mult("1,x", 64)
    with pytest.raises(ValueError, match="channel_mult"):
        parse_channel_mult("1,0", 64)
    model = create_model(48, 32, 1, channel_mult="1,2", attention_resolutions="24")
    assert model.channel_mult == (1, 2) and model.attention_resolutions == (2,)


def test_attention_resolutions_become_downsample_factors():
    assert parse_attention_resolutions("16,8", 64) == (4, 8)
    assert parse_attention_resolutions("32", 32) == (1,)
    assert parse_attention_resolutions("", 32) == ()
    with pytest.raises(ValueError, match=r"attention_resolutions entry 5 .*image_size=32"):
        parse_attention_resolutions("16,5", 32)
    with pytest.raises(ValueError, match="attention_resolutions"):
        parse_attention_resolutions("16;8", 32)


def test_guided_options_reach_the_model():
    model = create_model(
        32, 64, 1, attention_resolutions="16", num_head_channels=32, channel_mult="1,2",
        resblock_updown=True, use_new_attention_order=True,
    )  # fmt: skip
    attention = model.input_blocks[3][1]
    assert attention.attention.num_heads == 4 and attention.attention.order == "split"
    assert model.input_blocks[2][0].updown


def test_super_resolution_factory():
    model, diffusion = sr_create_model_and_diffusion(
        large_size=64, small_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="8",
        learn_sigma=True, diffusion_steps=50,
    )  # fmt: skip
    assert isinstance(model, SuperResModel) and model.in_channels == 6 and model.out_channels == 6
    assert diffusion.num_timesteps == 50
    with pytest.raises(ValueError, match="small_size"):
        script_util.sr_create_model(64, 64, 32, 1)
