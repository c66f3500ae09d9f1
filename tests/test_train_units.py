"""The training loop's pieces: microbatch averaging, fp16 loss scaling, EMA, checkpoints, metrics, flags."""

import os
import signal

import pytest
import torch
from tiny_run import TINY_MODEL_FLAGS, one_thread, tiny_loop  # noqa: F401 (one_thread: an autouse fixture)

from fastdiff import dist_util
from fastdiff.config import ConfigError, RunConfig, TrainConfig, parse_ema_rates
from fastdiff.runtime import checkpoint, precision
from fastdiff.runtime.backends import check_kernels
from fastdiff.training.ema import ParameterEMA
from fastdiff.training.metrics import IntervalMetrics
from fastdiff.training.optim import annealed_lr, build_optimizer
from fastdiff.training.stop import StopRequest

TINY = TINY_MODEL_FLAGS


@pytest.fixture(scope="module")
def ctx():
    context = dist_util.setup_dist("cpu")
    yield context
    dist_util.cleanup_dist()


def make_loop(ctx, tmp_path, precision_name="fp32", microbatch=4, batch=4, **flags):
    return tiny_loop(ctx, tmp_path, precision_name, batch, microbatch=microbatch, **flags)


def _grads(model):
    return [param.grad.clone() for param in model.parameters()]


def test_microbatch_losses_are_averaged_not_summed(ctx, tmp_path):
    """Gradients of one batch equal those of its microbatches (each weighted by its share)."""
    whole = make_loop(ctx, tmp_path / "a", microbatch=4)
    split = make_loop(ctx, tmp_path / "b", microbatch=2)
    single = make_loop(ctx, tmp_path / "c", microbatch=1)
    batch = next(whole.data)
    for loop in (whole, split, single):
        assert loop.run_step(*batch)
    reference = _grads(whole.model)
    for other in (_grads(split.model), _grads(single.model)):
        for want, got in zip(reference, other, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert any(grad.abs().sum() > 0 for grad in _grads(whole.model))


def test_fp16_overflow_skips_the_step_counts_it_and_lowers_the_scale(ctx, tmp_path):
    loop = make_loop(ctx, tmp_path, precision_name="fp16")
    assert loop.scaler is not None
    before = [param.detach().clone() for param in loop.model.parameters()]
    ema_before = [value.clone() for value in loop.ema.shadows[0]]
    scale = loop.scaler.get_scale()
    target = next(param for name, param in loop.model.named_parameters() if name.endswith("out.2.weight"))
    hook = target.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    applied = loop.run_step(*next(loop.data))
    hook.remove()
    assert not applied
    loop.settle_nonfinite()  # flags stay on the device until the loop reads them (log, save, every N steps)
    assert loop.skipped_steps == 1
    assert loop.scaler.get_scale() == scale * 0.5
    for old, param in zip(before, loop.model.parameters(), strict=True):
        assert torch.equal(old, param.detach()), "a non-finite step must never be applied"
    for old, value in zip(ema_before, loop.ema.shadows[0], strict=True):
        assert torch.equal(old, value)
    assert loop.run_step(*next(loop.data))
    loop.settle_nonfinite()
    assert loop.skipped_steps == 1
    after = [param.detach() for param in loop.model.parameters()]
    assert any(not torch.equal(old, new) for old, new in zip(before, after, strict=True))
    assert all(param.dtype == torch.float32 for param in loop.model.parameters()), "master weights stay fp32"


def test_bf16_autocast_trains_with_fp32_weights(ctx, tmp_path):
    loop = make_loop(ctx, tmp_path, precision_name="bf16")
    assert loop.run_step(*next(loop.data))
    values = loop.metrics.reduce()
    assert torch.isfinite(torch.tensor(values["loss"]))
    assert all(param.dtype == torch.float32 for param in loop.model.parameters())
    assert all(value.dtype == torch.float32 for value in loop.ema.shadows[0])


def test_grad_clip_bounds_the_applied_gradient(ctx, tmp_path):
    loop = make_loop(ctx, tmp_path, grad_clip=1e-3)
    loop.run_step(*next(loop.data))
    norm = torch.nn.utils.get_total_norm([param.grad for param in loop.model.parameters()])
    assert norm <= 1e-3 * 1.001


def test_metrics_are_grouped_by_timestep_quartile(ctx):
    metrics = IntervalMetrics(num_timesteps=50, device=torch.device("cpu"))
    metrics.add_losses(torch.tensor([0, 12, 13, 49]), {"loss": torch.tensor([1.0, 2.0, 4.0, 8.0])})
    metrics.add_losses(torch.tensor([30]), {"loss": torch.tensor([16.0])})
    metrics.add_scalar("grad_norm", torch.tensor(3.0))
    metrics.add_scalar("grad_norm", 5.0)
    values = metrics.reduce()
    assert values["loss"] == pytest.approx(31.0 / 5)
    assert values["loss_q0"] == pytest.approx(1.5)
    assert values["loss_q1"] == pytest.approx(4.0)
    assert values["loss_q2"] == pytest.approx(16.0)
    assert values["loss_q3"] == pytest.approx(8.0)
    assert values["grad_norm"] == pytest.approx(4.0)
    assert metrics.reduce() == {}, "reduce starts a new interval"


def test_ema_follows_improved_diffusions_formula():
    model = torch.nn.Linear(3, 2)
    ema = ParameterEMA(model, [0.9, 0.5])
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadows[0][0], 0.9 * start + 0.1 * (start + 1.0))
    torch.testing.assert_close(ema.shadows[1][0], 0.5 * start + 0.5 * (start + 1.0))
    restored = ParameterEMA(model, [0.9, 0.5])
    restored.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.shadows[1], ema.shadows[1], strict=True))
    state = ema.model_state_dict(model, 0)
    assert set(state) == set(model.state_dict()) and torch.equal(state["weight"], ema.shadows[0][0])
    with pytest.raises(ValueError, match="rates"):
        ParameterEMA(model, [0.99]).load_state_dict(ema.state_dict())


def test_ema_rates_parse_like_improved_diffusion():
    assert parse_ema_rates("0.9999") == [0.9999]
    assert parse_ema_rates("0.999,0.9999") == [0.999, 0.9999]
    for bad in ("", "0.5,x", "1.0"):
        with pytest.raises(ValueError, match="ema_rate"):
            parse_ema_rates(bad)


def test_checkpoint_names_match_improved_diffusion():
    assert checkpoint.model_filename(1200) == "model001200.pt"
    assert checkpoint.ema_filename(0.9999, 1200) == "ema_0.9999_001200.pt"
    assert checkpoint.opt_filename(7) == "opt000007.pt"
    assert checkpoint.state_filename(1234567) == "state1234567.pt"


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "model000001.pt"
    checkpoint.atomic_save({"w": torch.ones(2)}, str(target))
    original_save = torch.save

    def crash_midway(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save({"w": torch.zeros(2)}, str(target))
    with pytest.raises(OSError):
        checkpoint.atomic_save({"w": torch.zeros(2)}, str(tmp_path / "state000002.pt"))
    monkeypatch.setattr(torch, "save", original_save)
    assert sorted(os.listdir(tmp_path)) == ["model000001.pt"]
    assert torch.equal(torch.load(target)["w"], torch.ones(2))
    assert checkpoint.find_latest_state(str(tmp_path)) is None


def test_latest_state_and_pruning(tmp_path):
    for step in (5, 40, 300):
        checkpoint.atomic_save({"step": step}, str(tmp_path / checkpoint.state_filename(step)))
    (tmp_path / "state000900.pt.tmp.123").write_bytes(b"partial")
    assert checkpoint.find_latest_state(str(tmp_path)).endswith("state000300.pt")
    checkpoint.prune_states(str(tmp_path), keep=2)
    assert not (tmp_path / "state000005.pt").exists() and (tmp_path / "state000040.pt").exists()


def test_mismatched_keys_lists_every_problem():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    found = {"a": torch.zeros(2), "b": torch.zeros(4), "d": torch.zeros(1)}
    problems = " ".join(checkpoint.mismatched_keys(expected, found))
    assert "missing keys: c" in problems and "unexpected keys: d" in problems
    assert "b (expected [3], found [4])" in problems
    with pytest.raises(ValueError, match="missing keys: bias"):
        checkpoint.load_model_state(torch.nn.Linear(1, 1), {"weight": torch.zeros(1, 1)}, "x.pt")


def test_batch_size_rule():
    def sizes(batch_size, global_batch_size, world_size, given=True):
        return TrainConfig(batch_size=batch_size, global_batch_size=global_batch_size).batch_sizes(
            world_size, given
        )

    assert sizes(4, 0, 2) == (4, 8)
    assert sizes(1, 8, 2, given=False) == (4, 8)
    assert sizes(4, 8, 2) == (4, 8)
    with pytest.raises(ConfigError, match="pass only one, or make them agree"):
        sizes(3, 8, 2)
    with pytest.raises(ConfigError, match="not divisible by the 3 ranks"):
        sizes(1, 8, 3, given=False)
    with pytest.raises(ConfigError, match="not divisible by microbatch 3"):
        TrainConfig(microbatch=3).microbatch_size(8)
    assert (
        TrainConfig(microbatch=-1).microbatch_size(8) == 8
        and TrainConfig(microbatch=2).microbatch_size(8) == 2
    )
    with pytest.raises(ConfigError, match="save_interval"):
        RunConfig().with_flags({"save_interval": 0})


def test_precision_resolution_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", cpu).name == "fp32"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision("auto", cpu).name == "bf16"
    assert precision.resolve_precision("auto", cpu, use_fp16=True).name == "fp16"
    assert precision.resolve_precision("fp16", cpu).uses_grad_scaler
    assert precision.resolve_precision("bf16", cpu).autocast_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="use_fp16"):
        precision.resolve_precision("bf16", cpu, use_fp16=True)
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve_precision("fp8", cpu)
    monkeypatch.setattr(precision, "_cpu_autocast_runs", lambda dtype: False)
    with pytest.raises(precision.PrecisionUnsupportedError, match="cannot autocast to fp16 on the CPU"):
        precision.resolve_precision("fp16", cpu)


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "Tesla V100")
    gpu = torch.device("cuda", 0)
    with pytest.raises(precision.PrecisionUnsupportedError, match="V100 has no bf16"):
        precision.resolve_precision("bf16", gpu)
    assert precision.resolve_precision("auto", gpu).name == "fp32"
    assert precision.resolve_precision("fp16", gpu).name == "fp16"


def test_unavailable_kernels_are_refused(monkeypatch):
    from fastdiff import ops

    monkeypatch.setattr(ops, "available_backends", lambda: ["auto", "torch"])
    with pytest.raises(ValueError, match="--kernels triton is not available"):
        check_kernels("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="C\\+\\+ extension is not built"):
        check_kernels("cpp", torch.device("cpu"))
    with pytest.raises(ValueError, match="must be one of"):
        check_kernels("cuda", torch.device("cpu"))
    monkeypatch.setattr(ops, "available_backends", lambda: ["auto", "torch", "cpp"])
    with pytest.raises(ValueError, match="CPU tensors only"):
        check_kernels("cpp", torch.device("cuda", 0))
    backend_before = ops.get_backend()
    assert check_kernels("torch", torch.device("cpu")) == "torch"
    assert ops.get_backend() == backend_before, "checking selects nothing"


def test_optimizer_choices():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer("adamw", params, 1e-4, 0.0, torch.device("cpu")), torch.optim.AdamW)
    with pytest.raises(ValueError, match="apex"):
        build_optimizer("fused_adam", params, 1e-4, 0.0, torch.device("cpu"))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer("sgd", params, 1e-4, 0.0, torch.device("cpu"))
    assert annealed_lr(1e-4, 0, 0) == 1e-4
    assert annealed_lr(1e-4, 25, 100) == pytest.approx(0.75e-4)


def test_stop_request_turns_sigterm_and_sigint_into_a_flag():
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == previous


def test_reporter_shows_a_progress_bar_at_a_terminal(tmp_path, monkeypatch):
    from fastdiff.training.reporters import Reporter

    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    reporter = Reporter(str(tmp_path), is_main=True)
    reporter.start_progress(3, 10)
    assert reporter.bar is not None and reporter.bar.n == 3
    reporter.advance()
    assert reporter.bar.n == 4
    reporter.close()
    silent = Reporter(str(tmp_path / "other"), is_main=False)
    silent.start_progress(0, 10)
    silent.message("not written")
    assert silent.bar is None and not (tmp_path / "other").exists()


def test_tensorboard_scalars_when_tensorboard_is_importable(tmp_path, monkeypatch):
    import sys
    import types

    from fastdiff.training.reporters import TensorBoardLog

    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, name, value, step):
            written.append((name, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter)
    )
    log = TensorBoardLog(str(tmp_path))
    log.write({"step": 7, "loss": 0.5, "grad_norm": 2.0}, 7)
    assert written == [
        ("dir", str(tmp_path / "tensorboard")),
        ("train/loss", 0.5, 7),
        ("train/grad_norm", 2.0, 7),
    ]
