"""Non-finite steps in fp32, bf16 and fp16: skipped bit for bit, logged with their step, fatal N in a row."""

import csv
import os

import pytest
import torch
from tiny_run import TINY_MODEL_FLAGS, TINY_RUN_ARGV, one_thread, tiny_loop  # noqa: F401 (one_thread: autouse)

from fastdiff import dist_util, train
from fastdiff.training import nonfinite
from fastdiff.training.nonfinite import NonFiniteStepsError


@pytest.fixture(scope="module")
def ctx():
    context = dist_util.setup_dist("cpu")
    yield context
    dist_util.cleanup_dist()


def make_loop(ctx, tmp_path, precision_name):
    return tiny_loop(ctx, tmp_path, precision_name, microbatch=2, schedule_sampler="loss-second-moment")


def snapshot(loop) -> dict[str, torch.Tensor]:
    """Everything a step may change, as flat named tensors."""
    values = {f"model/{name}": value.clone() for name, value in loop.model.state_dict().items()}
    values.update({f"ema/{index}": value.clone() for index, value in enumerate(loop.ema.shadows[0])})
    for index, state in enumerate(loop.optimizer.state_dict()["state"].values()):
        values.update({f"opt/{index}/{key}": value.clone() for key, value in state.items()})
    values.update({f"sampler/{key}": value for key, value in loop.schedule_sampler.state_dict().items()})
    return values


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"differ: {different[:5]}"


@pytest.mark.parametrize("precision_name", ["fp32", "bf16", "fp16"])
def test_nan_steps_change_nothing_and_training_goes_on_as_if_they_never_ran(
    ctx, tmp_path, monkeypatch, precision_name
):
    """Steps 1 and 2 see a NaN loss: the run ends bit-identical to one that ran steps 0 and 3 only."""
    monkeypatch.setattr(nonfinite, "INJECT_NAN_AT_STEPS", frozenset({1, 2}))
    poisoned = make_loop(ctx, tmp_path / "poisoned", precision_name)
    after_first = None
    for step in range(4):
        poisoned.step = step
        applied = poisoned.run_step(*next(poisoned.data))
        assert bool(applied) == (step not in (1, 2))
        if step == 0:
            after_first = snapshot(poisoned)
        if step in (1, 2):
            assert_bit_identical(snapshot(poisoned), after_first)
    poisoned.settle_nonfinite()
    assert poisoned.skipped_steps == 2

    monkeypatch.setattr(nonfinite, "INJECT_NAN_AT_STEPS", frozenset())
    clean = make_loop(ctx, tmp_path / "clean", precision_name)
    for step in range(4):
        batch = next(clean.data)  # the data moves on over skipped steps, as in the poisoned run
        if step in (1, 2):
            continue
        if step == 3 and clean.scaler is not None:  # fp16: the skipped steps lowered the loss scale
            clean.scaler.update(poisoned.scaler.get_scale())
        clean.step = step
        assert bool(clean.run_step(*batch))
    assert_bit_identical(snapshot(poisoned), snapshot(clean))
    assert not torch.equal(snapshot(clean)["ema/0"], after_first["ema/0"]), "step 3 was applied"


def _train(log_dir, *extra) -> int:
    argv = [*TINY_RUN_ARGV, "--batch_size", "2", "--sample_interval", "0", "--num_workers", "0"]
    return train.main([*argv, "--log_interval", "1", "--log_dir", str(log_dir), *extra])


def test_skipped_steps_are_logged_with_their_step(tmp_path, monkeypatch):
    monkeypatch.setattr(nonfinite, "INJECT_NAN_AT_STEPS", frozenset({2, 4}))
    assert _train(tmp_path, "--max_steps", "6", "--max_bad_steps", "2") == 0
    log = (tmp_path / "log.txt").read_text()  # steps numbered as the log numbers them: index + 1
    assert "skipped step(s) 3: loss or gradient norm not finite" in log
    assert "skipped step(s) 5: loss or gradient norm not finite (2 skipped so far)" in log
    with open(tmp_path / "progress.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(float(row["skipped_steps"])) for row in rows] == [0, 0, 1, 1, 2, 2]
    assert all(float(row["grad_norm"]) > 0 for row in rows if row["grad_norm"] != "nan")
    assert torch.load(tmp_path / "state000006.pt", weights_only=True)["skipped_steps"] == 2


def test_max_bad_steps_in_a_row_stop_the_run_before_anything_is_saved(tmp_path, monkeypatch):
    monkeypatch.setattr(nonfinite, "INJECT_NAN_AT_STEPS", frozenset({1, 2, 3}))
    expected = r"training step 4 makes 3 steps in a row .*--max_bad_steps 3"
    with pytest.raises(NonFiniteStepsError, match=expected):
        _train(tmp_path, "--max_steps", "8", "--save_interval", "2", "--max_bad_steps", "3")
    states = sorted(path.name for path in tmp_path.glob("state*.pt"))
    assert states == ["state000002.pt"], "the last good checkpoint stays the newest"
    assert torch.load(tmp_path / "state000002.pt", weights_only=True)["step"] == 2
    assert not list(tmp_path.glob("*.tmp.*"))


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_bad_steps_must_be_positive(tmp_path, value):
    with pytest.raises(ValueError, match="--max_bad_steps must be positive"):
        _train(tmp_path, "--max_steps", "1", "--max_bad_steps", value)


def _two_ranks_one_poisoned(rank: int, store: str, out_dir: str) -> None:
    """Rank 1 alone sees a NaN loss at step 1; both ranks must skip it."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        if rank == 1:
            nonfinite.INJECT_NAN_AT_STEPS = frozenset({1})
        loop = make_loop(dist_util.setup_dist("cpu"), os.path.join(out_dir, f"rank{rank}"), "fp32")
        applied, params = [], []
        for step in range(3):
            loop.step = step
            applied.append(bool(loop.run_step(*next(loop.data))))
            params.append(torch.cat([param.detach().reshape(-1) for param in loop.model.parameters()]))
        loop.settle_nonfinite()
        result = {"applied": applied, "params": params, "skipped": loop.skipped_steps}
        torch.save(result, os.path.join(out_dir, f"result{rank}.pt"))
    finally:
        dist_util.destroy_group()


def test_every_rank_skips_a_step_that_is_non_finite_on_one_rank(tmp_path):
    torch.multiprocessing.spawn(
        _two_ranks_one_poisoned, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2
    )
    results = [torch.load(tmp_path / f"result{rank}.pt", weights_only=True) for rank in (0, 1)]
    for result in results:
        assert result["applied"] == [True, False, True] and result["skipped"] == 1
        assert torch.equal(result["params"][1], result["params"][0]), "step 1 is not applied"
        assert not torch.equal(result["params"][2], result["params"][1])
    for step in range(3):
        assert torch.equal(results[0]["params"][step], results[1]["params"][step]), "ranks stay identical"


@pytest.mark.parametrize("fused", [True, False])
def test_step_unless_leaves_weights_and_moments_alone_on_a_bad_step(fused):
    """Fused AdamW skips on the device; other optimizers (e.g. a state from before fused) after a read."""
    param = torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(1)))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=fused)
    assert nonfinite.supports_found_inf(optimizer) == fused
    param.grad = torch.ones(6)
    nonfinite.step_unless(optimizer, torch.tensor(False))
    before = [param.detach().clone(), *(value.clone() for value in optimizer.state[param].values())]
    param.grad = torch.full((6,), float("nan"))
    nonfinite.step_unless(optimizer, torch.tensor(True))
    after = [param.detach(), *optimizer.state[param].values()]
    assert all(torch.equal(old, new) for old, new in zip(before, after, strict=True))
    assert not hasattr(optimizer, "found_inf")
    param.grad = torch.ones(6)
    nonfinite.step_unless(optimizer, torch.tensor(False))
    assert float(optimizer.state[param]["step"]) == 2 and not torch.equal(param.detach(), before[0])
