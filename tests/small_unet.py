"""A small UNet configuration shared by the UNet tests."""


def small_config(**overrides) -> dict:
    """UNetModel kwargs: an 8x8, two-level UNet with attention and scale-shift, updated by ``overrides``."""
    config = dict(
        image_size=8,
        in_channels=3,
        model_channels=32,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_heads=2,
        use_scale_shift_norm=True,
    )
    config.update(overrides)
    return config
