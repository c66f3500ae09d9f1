"""fastdiff.integrations.diffusers: apply_fastdiff / remove_fastdiff on small random diffusers UNets.

No downloads: every model is built from a small config with random weights.
"""

import copy
import warnings
from collections import Counter

import pytest
import torch
from conftest import require_backend
from error_bounds import assert_no_worse, max_error
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D

from fastdiff import ops
from fastdiff.integrations import diffusers as integration
from fastdiff.integrations.diffusers import (
    FastdiffAttnProcessor,
    FastdiffResnetBlock2D,
    apply_fastdiff,
    remove_fastdiff,
)
from fastdiff.nn import GroupNorm32
from fastdiff.patch import NothingToPatchWarning, patches

pytestmark = pytest.mark.usefixtures("quiet_diffusers")


def unet_2d() -> nn.Module:
    """UNet2DModel: scale-shift ResnetBlocks, resnet down/up sampling, attention, a mid scale factor."""
    return UNet2DModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=2,
        attention_head_dim=16,
        resnet_time_scale_shift="scale_shift",
        downsample_type="resnet",
        upsample_type="resnet",
        mid_block_scale_factor=1.5,
    )


def unet_cond() -> nn.Module:
    """UNet2DConditionModel with self- and cross-attention (cross_attention_dim 8)."""
    return UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=2,
        cross_attention_dim=8,
        attention_head_dim=8,
    )


MODELS = {"UNet2DModel": unet_2d, "UNet2DConditionModel": unet_cond}


def model_inputs(name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict]:
    """(sample, keyword arguments) for one forward of the model ``name``, batch 2."""
    t = torch.tensor([10, 700])
    if name == "UNet2DModel":
        return torch.randn(2, 3, 8, 8, dtype=dtype), {"timestep": t}
    return torch.randn(2, 4, 4, 4, dtype=dtype), {
        "timestep": t,
        "encoder_hidden_states": torch.randn(2, 3, 8),
    }


def run(model: nn.Module, sample: torch.Tensor, kwargs: dict, dy: torch.Tensor):
    """(output, gradients of the sample and of every parameter) for the upstream gradient ``dy``."""
    sample = sample.detach().requires_grad_(True)
    dtype = sample.dtype
    kwargs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kwargs.items()}
    out = model(sample, **kwargs).sample
    grads = torch.autograd.grad(out, [sample, *model.parameters()], dy.to(out.dtype))
    return out.detach(), list(grads)


RELATIVE_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_and_gradients_match_before_and_after(backend, name, dtype):
    reference = MODELS[name]().double()
    model = copy.deepcopy(reference).to(dtype)
    sample, kwargs = model_inputs(name)
    dy = torch.randn_like(sample)
    expected = run(reference, sample.double(), kwargs, dy.double())
    before = run(model, sample.to(dtype), kwargs, dy)
    report = apply_fastdiff(model)
    after = run(model, sample.to(dtype), kwargs, dy)

    assert not report.empty and after[0].dtype == dtype
    bounds = dict(factor=2.0, floor=RELATIVE_FLOOR[dtype])  # at most twice diffusers' own error
    assert_no_worse([after[0]], [before[0]], [expected[0]], **bounds, what="output")
    assert_no_worse(after[1], before[1], expected[1], **bounds, what="gradient")


def kinds(model: nn.Module) -> tuple[list[str], list[str], list[str], list[str]]:
    """Paths of the model's ResnetBlock2Ds, self-attention and cross-attention modules, and of its
    GroupNorms other than the ResnetBlock2Ds' norm1 / norm2."""
    modules = dict(model.named_modules())
    resnets = [p for p, m in modules.items() if isinstance(m, ResnetBlock2D)]
    attention = [(p, m.is_cross_attention) for p, m in modules.items() if isinstance(m, Attention)]
    served = {f"{p}.{name}" for p in resnets for name in ("norm1", "norm2")}
    lone_norms = [p for p, m in modules.items() if type(m) is nn.GroupNorm and p not in served]
    self_attention = [p for p, cross in attention if not cross]
    return resnets, self_attention, [p for p, cross in attention if cross], lone_norms


def test_report_lists_patched_and_skipped_with_reasons():
    model = unet_cond()
    resnets, self_attention, cross_attention, lone_norms = kinds(model)
    report = apply_fastdiff(model)

    changed = {c.path: c.kind for c in report.changes}
    assert changed == {
        **dict.fromkeys(resnets, "norm1+silu, norm2+silu"),
        **dict.fromkeys(self_attention + cross_attention, "flash_attention"),
        **dict.fromkeys(lone_norms, "group_norm"),
    }
    assert len(resnets) == 8 and len(self_attention) == 4 and len(lone_norms) == 5
    assert len(cross_attention) == 4 and report.skipped == []
    assert all(type(model.get_submodule(p)) is FastdiffResnetBlock2D for p in resnets)
    for path in self_attention + cross_attention:
        assert type(model.get_submodule(path).processor) is FastdiffAttnProcessor
    assert all(type(model.get_submodule(p)) is GroupNorm32 for p in lone_norms)

    scale_shift = apply_fastdiff(unet_2d())
    assert Counter(c.kind for c in scale_shift.changes) == {
        "norm1+silu, norm2+scale_shift+silu": 10,  # with the resnet down and up samplers
        "flash_attention": 4,
        "group_norm": 4,  # 3 attention group_norms (the mid block's has none) and conv_norm_out
    }
    assert scale_shift.skipped == []


class FastdiffOpLog(TorchDispatchMode):
    """Counts the ``fastdiff::`` ops called beneath it, GroupNorm calls by variant."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastdiff":
            name = func._opname
            if name == "group_norm_fwd":
                silu, scaled = args[7], args[4] is not None
                name = (
                    "group_norm_scale_shift_silu" if scaled else ("group_norm_silu" if silu else "group_norm")
                )
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fastdiff_kernels():
    """The cpp backend forced: these tests count the fastdiff ops the patched modules call, and on a CPU
    ``auto`` may run short attention as PyTorch's matmuls instead (``fastdiff.ops.cpu_policy``)."""
    require_backend("cpp")
    with ops.use_backend("cpp"):
        yield


def test_compiled_patched_unet_traces_fastdiff_ops_in_one_graph(fastdiff_kernels):
    model = unet_2d()
    resnets, self_attention, _, lone_norms = kinds(model)
    apply_fastdiff(model)
    sample, kwargs = model_inputs("UNet2DModel")
    dy = torch.randn_like(sample)
    targets: list[str] = []

    def recording_backend(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(graph_module, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
    got = run(compiled, sample, kwargs, dy)
    expected = run(model, sample, kwargs, dy)
    torch._dynamo.reset()

    assert Counter(t for t in targets if "fastdiff" in t) == {
        "fastdiff.group_norm_fwd.default": 2 * len(resnets) + len(lone_norms),
        "fastdiff.attention_fwd.default": len(self_attention),
    }
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for index, (a, b) in enumerate(zip(got[1], expected[1], strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"gradient {index}")


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_unet_runs_fastdiff_ops_and_remove_restores_it(name, fastdiff_kernels):
    model = MODELS[name]()
    resnets, self_attention, cross_attention, lone_norms = kinds(model)
    attention = len(self_attention) + len(cross_attention)
    sample, kwargs = model_inputs(name)
    dy = torch.randn_like(sample)
    with FastdiffOpLog() as log:
        expected = run(model, sample, kwargs, dy)
    assert not log.calls
    modules = dict(model.named_modules())
    processors = {p: m.processor for p, m in modules.items() if isinstance(m, Attention)}
    keys = list(model.state_dict())

    report = apply_fastdiff(model)
    assert list(model.state_dict()) == keys
    with FastdiffOpLog() as log:
        run(model, sample, kwargs, dy)
    second = "group_norm_scale_shift_silu" if name == "UNet2DModel" else "group_norm_silu"
    calls = Counter({"group_norm_silu": len(resnets), "group_norm": len(lone_norms)})
    calls[second] += len(resnets)
    calls.update(attention_fwd=attention, attention_bwd=attention)
    calls["group_norm_bwd"] = 2 * len(resnets) + len(lone_norms)
    assert log.calls == calls

    assert remove_fastdiff(model) == [report] and not report.active and patches(model) == []
    assert dict(model.named_modules()) == modules  # the same objects at the same paths
    assert all(type(m) is ResnetBlock2D for m in model.modules() if isinstance(m, ResnetBlock2D))
    assert {p: m.processor for p, m in model.named_modules() if isinstance(m, Attention)} == processors
    with FastdiffOpLog() as log:
        restored = run(model, sample, kwargs, dy)
    assert not log.calls
    assert torch.equal(restored[0], expected[0])
    assert all(torch.equal(a, b) for a, b in zip(restored[1], expected[1], strict=True))
    with pytest.raises(ValueError, match="no active apply_fastdiff patch"):
        remove_fastdiff(model)


RESNET_CONFIGS = {
    "up": dict(up=True),
    "down": dict(down=True, out_channels=16),
    "fir_up": dict(up=True, kernel="fir"),
    "sde_vp_down": dict(down=True, kernel="sde_vp"),
    "no_temb": dict(temb_channels=None, output_scale_factor=2.0),
    "skip_time_act_scale_shift": dict(skip_time_act=True, time_embedding_norm="scale_shift"),
    "conv_shortcut_groups_out": dict(out_channels=16, conv_shortcut=True, groups_out=2, eps=1e-3),
    "dropout": dict(dropout=0.3),
}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("config", list(RESNET_CONFIGS))
def test_resnet_block_forward_matches_diffusers_in_every_branch(config, training):
    block = ResnetBlock2D(**{"in_channels": 8, "temb_channels": 6, "groups": 4, **RESNET_CONFIGS[config]})
    block.train(training)
    x = torch.randn(2, 8, 6, 4)
    temb = None if block.time_emb_proj is None else torch.randn(2, 6)
    leaves = [x.requires_grad_(True), *block.parameters()]

    def forward_backward() -> list[torch.Tensor]:
        torch.manual_seed(3)  # the same dropout mask in both runs
        out = block(x, temb)
        return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]

    expected = forward_backward()
    report = apply_fastdiff(block)
    assert report.paths == [""] and type(block) is FastdiffResnetBlock2D
    with ops.use_backend("torch"):
        got = forward_backward()
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):  # fp32 rounding, relative to the size
        assert max_error(a, b) <= 2e-5 * b.abs().max().item(), f"result {index}"


def test_unsupported_blocks_are_skipped_with_reasons_and_left_unchanged():
    hooked = ResnetBlock2D(in_channels=8, temb_channels=6, groups=4)
    hooked.norm1.register_forward_hook(lambda module, inputs, output: output)
    custom = Attention(query_dim=8, heads=2, dim_head=4, processor=AttnProcessor())
    parts = nn.ModuleDict(
        {
            "mish": ResnetBlock2D(in_channels=8, temb_channels=6, groups=4, non_linearity="mish"),
            "ada_group": ResnetBlockCondNorm2D(
                in_channels=8, temb_channels=6, groups=4, time_embedding_norm="ada_group"
            ),
            "hooked": hooked,
            "cross": Attention(query_dim=8, cross_attention_dim=5, heads=2, dim_head=4),
            "custom": custom,
            "kv_heads": Attention(query_dim=8, heads=2, kv_heads=1, dim_head=4),
            "supported": ResnetBlock2D(in_channels=8, temb_channels=6, groups=4),
        }
    )
    report = apply_fastdiff(parts)

    reasons = {s.path: s.reason for s in report.skipped}
    assert set(reasons) == {"mish", "ada_group", "hooked", "hooked.norm1", "custom", "kv_heads"}
    assert "nonlinearity is Mish" in reasons["mish"]
    assert "ResnetBlockCondNorm2D" in reasons["ada_group"] and "AdaGroupNorm" in reasons["ada_group"]
    assert "norm1 has hooks" in reasons["hooked"] and "has hooks" in reasons["hooked.norm1"]
    assert "AttnProcessor, not AttnProcessor2_0" in reasons["custom"]
    assert "kv_heads" in reasons["kv_heads"]
    assert type(parts["mish"]) is ResnetBlock2D and type(parts["hooked"]) is ResnetBlock2D
    assert type(custom.processor) is AttnProcessor
    assert type(parts["supported"]) is FastdiffResnetBlock2D
    # the norms of skipped blocks still go through the lone GroupNorm rewrite, unless hooked
    assert set(report.paths) == {"supported", "cross", "mish.norm1", "mish.norm2", "hooked.norm2"}
    assert type(parts["cross"].processor) is FastdiffAttnProcessor
    assert type(parts["hooked"].norm1) is nn.GroupNorm


def test_unknown_diffusers_code_is_reported_not_patched(monkeypatch):
    for name, (function, _) in integration.MIRRORED_CODE.items():
        monkeypatch.setitem(
            integration.MIRRORED_CODE, name, (function, {"0000000000000000": "diffusers 0.0"})
        )
    model = unet_2d()
    resnets, self_attention, _, lone_norms = kinds(model)
    sample, kwargs = model_inputs("UNet2DModel")
    dy = torch.randn_like(sample)
    expected = run(model, sample, kwargs, dy)
    report = apply_fastdiff(model)

    assert sorted(s.path for s in report.skipped) == sorted(resnets + self_attention)
    assert all("is not the code fastdiff mirrors (diffusers 0.0)" in s.reason for s in report.skipped)
    # only the GroupNorm rewrite, which mirrors no diffusers code: it swaps the skipped blocks' norms too
    resnet_norms = [f"{p}.{norm}" for p in resnets for norm in ("norm1", "norm2")]
    assert sorted(report.paths) == sorted(lone_norms + resnet_norms)
    assert {c.kind for c in report.changes} == {"group_norm"}
    assert not any(isinstance(m, FastdiffResnetBlock2D) for m in model.modules())
    got = run(model, sample, kwargs, dy)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)


def test_applying_twice_is_a_reported_no_op_and_bad_input_is_refused():
    model = unet_cond()
    first = apply_fastdiff(model)
    with pytest.warns(NothingToPatchWarning, match="already use fastdiff"):
        second = apply_fastdiff(model)
    assert second.empty and len(second.already_patched) == 8 + 8 + 5
    assert patches(model) == [first]
    with pytest.raises(TypeError, match="unet must be a torch"):
        apply_fastdiff("unet")
    with pytest.raises(ValueError, match="no active apply_fastdiff patch"):
        remove_fastdiff(nn.Linear(2, 2))
    with pytest.warns(NothingToPatchWarning, match="nothing to patch in Linear"):
        assert apply_fastdiff(nn.Linear(2, 2)).empty


def test_processor_falls_back_to_diffusers_for_a_mask_and_says_so():
    attention = Attention(query_dim=8, heads=2, dim_head=4)
    hidden = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 1, 5)
    mask[:, :, -1] = -1e4
    expected = attention(hidden, attention_mask=mask)
    apply_fastdiff(attention)
    processor = attention.processor
    with pytest.warns(UserWarning, match="attention_mask given"):
        got = attention(hidden, attention_mask=mask)
    torch.testing.assert_close(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, counted every time
        attention(hidden, attention_mask=mask)
    assert processor.fallback_calls == 2
    torch.testing.assert_close(attention(hidden), processor.fallback(attention, hidden), rtol=1e-5, atol=1e-6)
    assert processor.fallback_calls == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_attention_runs_flash_attention_and_matches_diffusers(backend, dtype):
    """UNet2DConditionModel's cross-attention (4x4 and 2x2 queries, 3 encoder tokens): patched, its
    processors call flash_attention with Tq != Tk, never diffusers' processor, and the model gives the
    unpatched outputs and gradients (no worse against float64 than diffusers' own run)."""
    reference = unet_cond().double()
    model = copy.deepcopy(reference).to(dtype)
    _, _, cross_attention, _ = kinds(model)
    sample, kwargs = model_inputs("UNet2DConditionModel")
    dy = torch.randn_like(sample)
    expected = run(reference, sample.double(), kwargs, dy.double())
    before = run(model, sample.to(dtype), kwargs, dy)
    apply_fastdiff(model)
    processors = [model.get_submodule(path).processor for path in cross_attention]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        after = run(model, sample.to(dtype), kwargs, dy)
    assert all(type(p) is FastdiffAttnProcessor and p.fallback_calls == 0 for p in processors)
    bounds = dict(factor=2.0, floor=RELATIVE_FLOOR[dtype])
    assert_no_worse([after[0]], [before[0]], [expected[0]], **bounds, what="output")
    assert_no_worse(after[1], before[1], expected[1], **bounds, what="gradient")


def test_cross_attention_with_a_mask_runs_diffusers_processor():
    attention = Attention(query_dim=8, cross_attention_dim=5, heads=2, dim_head=4)
    hidden, context = torch.randn(2, 6, 8), torch.randn(2, 3, 5)
    mask = torch.zeros(2, 1, 3)
    mask[:, :, -1] = -1e4
    expected_masked, expected = attention(hidden, context, attention_mask=mask), attention(hidden, context)
    apply_fastdiff(attention)
    with pytest.warns(UserWarning, match="attention_mask given"):
        torch.testing.assert_close(attention(hidden, context, attention_mask=mask), expected_masked)
    with ops.use_backend("triton"):
        torch.testing.assert_close(attention(hidden, context), expected, rtol=1e-5, atol=1e-6)
    assert attention.processor.fallback_calls == 1
