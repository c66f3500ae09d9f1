"""Writes tests/data/unet_reference.pt: UNet outputs computed by OpenAI's own code, for fastdiff's tests.

The file holds ``{"fixtures": {name: fixture}}``; each fixture is a dict ``{"source", "config",
"state_dict", "x", "t", "y", "output"}`` where ``source`` is ``improved`` or ``guided``, ``config``
holds the keyword arguments of ``fastdiff.UNetModel``, ``state_dict`` carries exactly the reference
model's keys and shapes with random float32 values (the reference zero-initialises several output
convolutions, which would make a comparison vacuous), and ``output`` is the reference forward pass
in float32, eval mode, with those weights loaded ``strict=True``.

Every weight is a view into one of three shared random pools (matrices, GroupNorm gains, biases) at a
random offset, so ``torch.save`` stores each pool once and the file stays small however large the
configurations are.

The reference repositories are not part of fastdiff; point this script at read-only clones::

    python tests/data/make_reference_fixtures.py --improved /tmp/ref/improved-diffusion \\
        --guided /tmp/ref/guided-diffusion
"""

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE_FILE = "unet_reference.pt"

CONFIGS: dict[str, tuple[str, dict, tuple[int, ...], bool]] = {
    # name: (reference, fastdiff.UNetModel kwargs, input shape, float timesteps)
    "improved_basic": (
        "improved",
        dict(
            image_size=16,
            in_channels=3,
            model_channels=32,
            out_channels=3,
            num_res_blocks=2,
            attention_resolutions=(2,),
            channel_mult=(1, 2),
            num_heads=1,
        ),
        (2, 3, 16, 16),
        False,
    ),
    "improved_learn_sigma_scale_shift": (
        "improved",
        dict(
            image_size=32,
            in_channels=3,
            model_channels=32,
            out_channels=6,
            num_res_blocks=1,
            attention_resolutions=(2, 4),
            channel_mult=(1, 2, 2),
            num_heads=2,
            num_heads_upsample=4,
            use_scale_shift_norm=True,
        ),
        (2, 3, 32, 32),
        True,
    ),
    "improved_class_cond": (
        "improved",
        dict(
            image_size=16,
            in_channels=3,
            model_channels=32,
            out_channels=3,
            num_res_blocks=1,
            attention_resolutions=(2,),
            channel_mult=(1, 2),
            num_classes=10,
            num_heads=1,
            use_scale_shift_norm=True,
        ),
        (3, 3, 16, 16),
        False,
    ),
    "guided_updown_new_order": (
        "guided",
        dict(
            image_size=16,
            in_channels=3,
            model_channels=32,
            out_channels=3,
            num_res_blocks=1,
            attention_resolutions=(1, 2),
            channel_mult=(1, 2),
            num_head_channels=16,
            use_scale_shift_norm=True,
            resblock_updown=True,
            use_new_attention_order=True,
        ),
        (2, 3, 16, 16),
        True,
    ),
    "guided_half_mult_avgpool_legacy": (
        "guided",
        dict(
            image_size=16,
            in_channels=3,
            model_channels=64,
            out_channels=6,
            num_res_blocks=1,
            attention_resolutions=(2,),
            channel_mult=(0.5, 1),
            conv_resample=False,
            num_head_channels=32,
            use_scale_shift_norm=False,
        ),
        (2, 3, 16, 16),
        False,
    ),
    "improved_dims1": (
        "improved",
        dict(
            image_size=16,
            in_channels=3,
            model_channels=32,
            out_channels=3,
            num_res_blocks=1,
            attention_resolutions=(2,),
            channel_mult=(1, 1),
            dims=1,
            num_heads=2,
            use_scale_shift_norm=True,
        ),
        (2, 3, 16),
        False,
    ),
    "improved_dims3": (
        "improved",
        dict(
            image_size=8,
            in_channels=3,
            model_channels=32,
            out_channels=3,
            num_res_blocks=1,
            attention_resolutions=(2,),
            channel_mult=(1, 1),
            dims=3,
            num_heads=1,
        ),
        (2, 3, 3, 8, 8),
        False,
    ),
}


POOL_SIZES = {"matrix": 120_000, "gain": 1024, "bias": 1024}


def make_pools(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random values every fixture's weights are views of: matrices, GroupNorm gains, biases."""
    return {
        "matrix": 0.06 * torch.randn(POOL_SIZES["matrix"], generator=generator),
        "gain": 1.0 + 0.2 * torch.randn(POOL_SIZES["gain"], generator=generator),
        "bias": 0.2 * torch.randn(POOL_SIZES["bias"], generator=generator),
    }


def random_state_dict(
    model: torch.nn.Module, pools: dict[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The model's state-dict keys, each bound to a window of a pool at a random offset.

    The windows are views, so ``torch.save`` stores each pool once however many fixtures use it; the
    random offsets make every layer's weights different.
    """
    state = {}
    for name, p in model.state_dict().items():
        kind = "matrix" if p.ndim >= 2 else ("gain" if name.endswith("weight") else "bias")
        pool = pools[kind]
        if p.numel() > pool.numel():
            raise ValueError(f"{name} has {p.numel()} elements; enlarge POOL_SIZES[{kind!r}]")
        offset = int(torch.randint(0, pool.numel() - p.numel() + 1, (1,), generator=generator))
        state[name] = pool[offset : offset + p.numel()].view(p.shape)
    return state


def build_reference(source: str, config: dict) -> torch.nn.Module:
    if source == "improved":
        from improved_diffusion.unet import UNetModel

        kwargs = {k: v for k, v in config.items() if k != "image_size"}
    else:
        from guided_diffusion.unet import UNetModel

        kwargs = dict(config)
    return UNetModel(**kwargs)


def make_fixture(name: str, pools: dict[str, torch.Tensor], generator: torch.Generator) -> dict:
    source, config, shape, float_t = CONFIGS[name]
    model = build_reference(source, config).eval()
    state_dict = random_state_dict(model, pools, generator)
    model.load_state_dict(state_dict, strict=True)
    x = torch.randn(shape, generator=generator)
    n = shape[0]
    if float_t:
        t = torch.rand(n, generator=generator) * 1000.0
    else:
        t = torch.randint(0, 1000, (n,), generator=generator)
    y = None
    if config.get("num_classes") is not None:
        y = torch.randint(0, config["num_classes"], (n,), generator=generator)
    with torch.no_grad():
        output = model(x, t, y=y) if y is not None else model(x, t)
    return dict(source=source, config=config, state_dict=state_dict, x=x, t=t, y=y, output=output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--improved", default="/tmp/ref/improved-diffusion", help="improved-diffusion clone")
    parser.add_argument("--guided", default="/tmp/ref/guided-diffusion", help="guided-diffusion clone")
    parser.add_argument("--out", default=os.path.join(HERE, FIXTURE_FILE), help="output .pt file")
    args = parser.parse_args()
    sys.path[:0] = [args.improved, args.guided]
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    pools = make_pools(generator)
    fixtures = {}
    for name in CONFIGS:
        fixtures[name] = make_fixture(name, pools, generator)
        out = fixtures[name]["output"]
        params = sum(v.numel() for v in fixtures[name]["state_dict"].values())
        print(f"{name}: {params} parameters, output mean |.| {out.abs().mean():.3f} std {out.std():.3f}")
    torch.save({"fixtures": fixtures}, args.out)
    print(f"{args.out}: {os.path.getsize(args.out) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
