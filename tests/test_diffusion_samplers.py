"""Timestep samplers: uniform and loss-second-moment importance sampling, state, and rank gathering."""

import io
import os
import socket
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastdiff.diffusion import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)


def _fake_diffusion(num_timesteps):
    return types.SimpleNamespace(num_timesteps=num_timesteps)


def test_named_samplers():
    diffusion = _fake_diffusion(10)
    assert isinstance(create_named_schedule_sampler("uniform", diffusion), UniformSampler)
    assert isinstance(
        create_named_schedule_sampler("loss-second-moment", diffusion), LossSecondMomentResampler
    )
    with pytest.raises(ValueError, match=r"name 'lsm'.*uniform.*loss-second-moment"):
        create_named_schedule_sampler("lsm", diffusion)


def test_uniform_sampler_weights_range_and_frequencies():
    sampler = UniformSampler(_fake_diffusion(8))
    torch.manual_seed(0)
    t, w = sampler.sample(40000, "cpu")
    assert t.dtype == torch.long and w.dtype == torch.float32 and t.shape == w.shape == (40000,)
    assert torch.all(w == 1.0)
    counts = torch.bincount(t, minlength=8).double()
    assert counts.numel() == 8
    # Each count is Binomial(40000, 1/8): mean 5000, std about 66.
    assert (counts - 5000).abs().max().item() < 330
    t0, _ = sampler.sample(0, "cpu")
    assert t0.shape == (0,)
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample(-1, "cpu")


def test_sampling_follows_torch_seed_and_generators():
    sampler = UniformSampler(_fake_diffusion(1000))
    torch.manual_seed(3)
    first, _ = sampler.sample(64, "cpu")
    torch.manual_seed(3)
    again, _ = sampler.sample(64, "cpu")
    assert torch.equal(first, again)
    draws = [sampler.sample(64, "cpu", generator=torch.Generator().manual_seed(5))[0] for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], first)


def _warm_sampler(num_timesteps=6, history=3, uniform_prob=0.1):
    sampler = LossSecondMomentResampler(
        _fake_diffusion(num_timesteps), history_per_term=history, uniform_prob=uniform_prob
    )
    for round_ in range(history):
        ts = list(range(num_timesteps))
        # Step 0 has large losses, the rest small ones that grow with the step.
        losses = [10.0 + round_] + [0.1 * (s + round_) + 0.05 for s in ts[1:]]
        sampler.update_with_all_losses(ts, losses)
    return sampler


def test_loss_second_moment_is_uniform_until_warm():
    sampler = LossSecondMomentResampler(_fake_diffusion(4), history_per_term=2)
    sampler.update_with_all_losses([0, 1, 2, 3, 0, 1, 2], [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0])
    np.testing.assert_array_equal(sampler.weights(), np.ones(4))  # step 3 has one loss of two
    sampler.update_with_all_losses([3], [4.0])
    assert not np.allclose(sampler.weights(), sampler.weights()[0])


def test_loss_second_moment_weights_closed_form_and_preference():
    sampler = _warm_sampler()
    history = np.array([[10.0 + r] + [0.1 * (s + r) + 0.05 for s in range(1, 6)] for r in range(3)]).T
    rms = np.sqrt((history**2).mean(axis=1))
    expected = rms / rms.sum() * 0.9 + 0.1 / 6
    np.testing.assert_allclose(sampler.weights(), expected, rtol=1e-12)

    torch.manual_seed(1)
    t, w = sampler.sample(20000, "cpu")
    freq = torch.bincount(t, minlength=6).double() / 20000
    probs = expected / expected.sum()
    np.testing.assert_allclose(freq.numpy(), probs, atol=0.015)
    assert freq[0] > 0.7 and freq[0] > 5 * freq[1:].max()  # the high-loss step dominates
    torch.testing.assert_close(w, torch.from_numpy(1 / (6 * probs[t.numpy()])).float())


def test_importance_weights_keep_the_uniform_mean():
    """E_p[w(t) f(t)] = mean_t f(t) exactly, and the Monte Carlo estimate agrees."""
    sampler = _warm_sampler(num_timesteps=6, uniform_prob=0.05)
    f = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0], dtype=torch.float64)
    probs = torch.from_numpy(sampler.weights() / sampler.weights().sum())
    exact = (probs * (1 / (6 * probs)) * f).sum()
    assert exact.item() == pytest.approx(f.mean().item(), rel=1e-12)
    torch.manual_seed(2)
    t, w = sampler.sample(200000, "cpu")
    estimate = (w.double() * f[t]).mean().item()
    assert estimate == pytest.approx(f.mean().item(), rel=0.05)


def test_history_keeps_the_latest_losses():
    sampler = LossSecondMomentResampler(_fake_diffusion(2), history_per_term=3, uniform_prob=0.0)
    sampler.update_with_all_losses([0] * 5 + [1] * 3, [1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 1.0, 1.0])
    # Step 0 keeps 3, 4, 5: RMS sqrt(50 / 3); step 1 keeps 1, 1, 1.
    rms0 = np.sqrt(50 / 3)
    np.testing.assert_allclose(sampler.weights(), [rms0 / (rms0 + 1), 1 / (rms0 + 1)], rtol=1e-12)
    with pytest.raises(ValueError, match="outside"):
        sampler.update_with_all_losses([2], [1.0])


def test_update_with_local_losses_without_distributed():
    sampler = LossSecondMomentResampler(_fake_diffusion(3), history_per_term=1, uniform_prob=0.0)
    sampler.update_with_local_losses(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 2.0]))
    np.testing.assert_allclose(sampler.weights(), [0.2, 0.4, 0.4])
    with pytest.raises(ValueError, match="same length"):
        sampler.update_with_local_losses(torch.tensor([0, 1]), torch.tensor([1.0]))


def test_state_round_trip_restores_sampling_exactly():
    sampler = _warm_sampler()
    sampler.update_with_all_losses([2, 2], [7.0, 8.0])
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    restored = LossSecondMomentResampler(_fake_diffusion(6), history_per_term=3, uniform_prob=0.1)
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.weights(), sampler.weights())
    torch.manual_seed(4)
    expected = sampler.sample(32, "cpu")
    torch.manual_seed(4)
    got = restored.sample(32, "cpu")
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    # The state is a copy: later updates of the original do not leak into it.
    sampler.update_with_all_losses([0], [100.0])
    assert not np.array_equal(restored.weights(), sampler.weights())

    with pytest.raises(ValueError, match="history_per_term"):
        LossSecondMomentResampler(_fake_diffusion(6), history_per_term=4).load_state_dict(state)
    uniform = UniformSampler(_fake_diffusion(6))
    uniform.load_state_dict(uniform.state_dict())
    with pytest.raises(ValueError, match="no state"):
        uniform.load_state_dict(state)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank, world_size, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        sampler = LossSecondMomentResampler(_fake_diffusion(5), history_per_term=2, uniform_prob=0.0)
        # Ranks hold different batch sizes (3 and 1), so the gather has to pad.
        if rank == 0:
            ts, losses = torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0])
        else:
            ts, losses = torch.tensor([4]), torch.tensor([5.0])
        sampler.update_with_local_losses(ts, losses)
        torch.save(sampler.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_update_with_local_losses_gathers_every_rank(tmp_path):
    mp.start_processes(
        _gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    expected_history = torch.tensor(
        [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 0.0], [5.0, 0.0]], dtype=torch.float64
    )
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(state["loss_history"], expected_history)
        assert state["loss_counts"].tolist() == [1, 1, 1, 0, 1]
