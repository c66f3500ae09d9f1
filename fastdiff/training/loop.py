"""The training loop: one readable step (microbatches, mixed precision, DDP), logging, saving, resuming.

Step ``s`` (0-based; ``self.step`` counts completed steps) takes one batch per rank, draws timesteps and
noise as pure functions of (seed, s, position in the global batch), runs the microbatches (each loss
weighted by its share of the batch; DDP synchronises gradients on the last one only), then one optimizer
step in fp32 (skipped and counted when fp16 loss scaling finds non-finite gradients) and one EMA update.
"""

import contextlib
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from fastdiff import dist_util
from fastdiff.config import RunConfig, write_run_config
from fastdiff.data.loader import BatchStream
from fastdiff.diffusion import LossAwareSampler
from fastdiff.dist_util import DistContext
from fastdiff.runtime.checkpoint import (
    atomic_save,
    ema_filename,
    load_model_state,
    model_filename,
    opt_filename,
    prune_states,
    state_filename,
)
from fastdiff.runtime.precision import Precision
from fastdiff.runtime.rng import StepRandomness, capture_rng_state, restore_rng_state, seed_everything
from fastdiff.training.class_dropout import drop_class_labels
from fastdiff.training.ema import ParameterEMA
from fastdiff.training.metrics import IntervalMetrics, max_over_ranks, peak_memory_gib
from fastdiff.training.nonfinite import NonFiniteSteps, inject_test_nan, is_bad, poison_nonfinite, step_unless
from fastdiff.training.optim import annealed_lr, build_optimizer, set_lr
from fastdiff.training.preview import SamplePreview
from fastdiff.training.quality import TrainingEvaluation
from fastdiff.training.reporters import Reporter
from fastdiff.training.resume import (
    STATE_FORMAT,
    STATE_VERSION,
    ResumeSource,
    check_training_state,
    find_resume_source,
)
from fastdiff.training.state import StateRegistry
from fastdiff.training.stop import StopRequest


def _cpu_copy(state: dict) -> dict:
    """A state_dict with every tensor detached and copied to the CPU."""
    return {name: value.detach().cpu().clone() for name, value in state.items()}


class TrainLoop:
    """Trains ``model`` on ``data`` with ``diffusion``'s losses; see the module docstring for one step.

    ``config`` is the run's whole config, ``config.train.batch_size`` the per-rank batch (resolved from
    ``--global_batch_size`` by fastdiff.train).
    """

    def __init__(
        self,
        *,
        config: RunConfig,
        model: torch.nn.Module,
        diffusion,
        data: BatchStream,
        schedule_sampler,
        ctx: DistContext,
        precision: Precision,
        preview: SamplePreview | None = None,
        evaluation: TrainingEvaluation | None = None,
    ) -> None:
        self.config = config
        self.settings = settings = config.train
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.schedule_sampler = schedule_sampler
        self.ctx = ctx
        self.precision = precision
        self.preview = preview
        self.evaluation = evaluation
        self.microbatch = settings.microbatch_size(settings.batch_size)
        self.global_batch = settings.batch_size * ctx.world_size

        if settings.channels_last:
            self.model.to(memory_format=torch.channels_last)
        dist_util.sync_params(list(self.model.parameters()) + list(self.model.buffers()))
        self.ddp = (
            DistributedDataParallel(
                self.model,
                device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                bucket_cap_mb=128,
            )
            if ctx.world_size > 1
            else None
        )
        forward_model = self.ddp if self.ddp is not None else self.model
        self.train_model = torch.compile(forward_model) if settings.compile else forward_model
        self.optimizer = build_optimizer(
            settings.optimizer, self.model.parameters(), settings.lr, settings.weight_decay, ctx.device
        )
        self.scaler = torch.amp.GradScaler(ctx.device.type) if precision.uses_grad_scaler else None
        self.ema = ParameterEMA(self.model, settings.ema_rates, warmup=settings.ema_warmup)
        self.randomness = StepRandomness(config.runtime.seed, ctx.device)
        self.metrics = IntervalMetrics(diffusion.num_timesteps, ctx.device)
        self.reporter = Reporter(settings.log_dir, ctx.is_main)
        self.step = 0
        self.nonfinite = NonFiniteSteps(settings.max_bad_steps)
        self.last_saved_step: int | None = None
        self.last_preview_step: int | None = None
        self._rng_states: list = []
        self._saved_world_size = ctx.world_size
        self.data_wait = 0.0
        """Seconds this rank blocked on the next batch since the last log line."""
        self.state = self._state_registry()

    # ------------------------------------------------------------------ one step

    @property
    def skipped_steps(self) -> int:
        """Steps not applied because their loss or gradient norm was not finite (as of the last settle)."""
        return self.nonfinite.skipped_steps

    def run_step(self, images: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step on this rank's ``images`` ``[B, 3, S, S]``; returns whether it was applied
        (a 0-dim bool tensor on the device: reading it syncs). A step whose loss or gradient norm is not
        finite changes nothing: weights, optimizer, EMA and the timestep sampler stay as they were."""
        batch = images.shape[0]
        first = self.ctx.rank * batch
        t_all, weights_all = self.randomness.timesteps(
            self.schedule_sampler, self.step, self.global_batch, first, batch
        )
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        seen_t, seen_losses = [], []
        for start in range(0, batch, self.microbatch):
            end = min(start + self.microbatch, batch)
            losses, t, weights = self._forward_backward(images, cond, t_all, weights_all, start, end, first)
            self.metrics.add_losses(
                t, {name: value.detach().float() * weights for name, value in losses.items()}
            )
            seen_t.append(t)
            seen_losses.append(losses["loss"].detach().float())
        bad = self._optimizer_step()
        # The loss-aware sampler reads the losses on the host (a sync it makes anyway); reading `bad` first
        # keeps a skipped step's losses out of its history at no extra wait.
        if isinstance(self.schedule_sampler, LossAwareSampler) and not bool(bad):
            self.schedule_sampler.update_with_local_losses(torch.cat(seen_t), torch.cat(seen_losses))
        self.nonfinite.record(self.step + 1, bad)  # numbered as the log numbers it
        return ~bad

    def _forward_backward(self, images, cond, t_all, weights_all, start: int, end: int, first: int):
        """Losses of microbatch ``[start, end)`` and their backward, scaled by its share of the batch."""
        device = self.ctx.device
        memory_format = torch.channels_last if self.settings.channels_last else torch.contiguous_format
        micro = images[start:end].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        micro_cond = {name: value[start:end].to(device, non_blocking=True) for name, value in cond.items()}
        dropout = self.config.model.class_dropout_prob
        if dropout > 0:
            micro_cond["y"] = drop_class_labels(
                micro_cond["y"],
                dropout,
                self.model.null_label,
                self.config.runtime.seed,
                self.step,
                first + start,
            )
        t, weights = t_all[start:end], weights_all[start:end]
        noise = self.randomness.noise(self.step, first + start, tuple(micro.shape), micro.dtype)
        noise = noise.contiguous(memory_format=memory_format)
        is_last = end >= images.shape[0]
        sync = contextlib.nullcontext() if is_last or self.ddp is None else self.ddp.no_sync()
        with sync:
            with self.precision.autocast():
                losses = self.diffusion.training_losses(
                    self.train_model, micro, t, model_kwargs=micro_cond, noise=noise
                )
            loss = (losses["loss"].float() * weights).mean() * ((end - start) / images.shape[0])
            loss = poison_nonfinite(inject_test_nan(loss, self.step))
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return losses, t, weights

    def _optimizer_step(self) -> torch.Tensor:
        """Clip, step and update the EMA unless the gradient norm is not finite; returns that flag (0-dim
        bool on the device). See fastdiff/training/nonfinite.py for how every rank agrees without a sync."""
        set_lr(self.optimizer, annealed_lr(self.settings.lr, self.step, self.settings.lr_anneal_steps))
        params = [param for param in self.model.parameters() if param.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.get_total_norm([param.grad for param in params])
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.settings.grad_clip, grad_norm)
        bad = is_bad(grad_norm)
        if self.scaler is not None:  # GradScaler finds the same non-finite gradients and skips likewise
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            step_unless(self.optimizer, bad)
        self.ema.update(self.model, skip=bad)
        self.metrics.add_scalar("grad_norm", torch.where(bad, 0.0, grad_norm.double()))
        self.metrics.add_scalar("grad_norm_count", (~bad).double())
        return bad

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        """Resume if there is a state, train to the last step (or a stop signal); returns the step reached."""
        try:
            self.resume()
            if self.ctx.is_main:
                write_run_config(self.config, self.settings.log_dir)
            last = self.settings.last_step()
            if last is not None and self.step >= last:
                self.reporter.message(
                    f"step {self.step} already reaches the last step {last}: nothing to train"
                )
                return self.step
            self.reporter.start_progress(self.step, last)
            with StopRequest() as stop:
                self._train_until(last, stop)
            return self.step
        finally:
            self.data.close()
            self.reporter.close()

    def _train_until(self, last: int | None, stop: StopRequest) -> None:
        settings = self.settings
        interval_start, interval_steps = time.perf_counter(), 0
        while last is None or self.step < last:
            waited = time.perf_counter()
            batch, error = self._next_batch()
            self.data_wait += time.perf_counter() - waited
            stop_now, failed = self._agree(stop.requested, error is not None)
            if stop_now:
                self.reporter.message(
                    f"{stop.signal_name or 'stop requested'}: saving step {self.step}, exiting"
                )
                self.save()
                return
            if failed:
                self.reporter.message(f"loading data failed: saving step {self.step} before stopping")
                self.save()
                raise error if error is not None else RuntimeError("another rank failed to load its data")
            self.run_step(*batch)
            self.step += 1
            if self.nonfinite.due:
                self.settle_nonfinite()
            interval_steps += 1
            self.reporter.advance()
            if self.step % settings.log_interval == 0:
                self.log(interval_steps, time.perf_counter() - interval_start)
                interval_start, interval_steps = time.perf_counter(), 0
            if self.step % settings.save_interval == 0:
                self.save()
            if settings.sample_interval and self.step % settings.sample_interval == 0:
                self.write_preview()
            if self.evaluation is not None and self.step % self.evaluation.interval == 0:
                self.evaluate()
        if self.last_saved_step != self.step:
            self.save()
        if settings.sample_interval and self.last_preview_step != self.step:
            self.write_preview()

    def _next_batch(self) -> tuple[tuple | None, BaseException | None]:
        try:
            return next(self.data), None
        except Exception as error:
            return None, error

    def _agree(self, stop: bool, failed: bool) -> tuple[bool, bool]:
        """(any rank asked to stop, any rank failed to load data), the same answer on every rank."""
        if self.ctx.world_size == 1:
            return stop, failed
        flags = torch.tensor([float(stop), float(failed)], device=self.ctx.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        stop_any, failed_any = flags.tolist()
        return stop_any > 0, failed_any > 0

    def settle_nonfinite(self) -> None:
        """Read the pending non-finite flags (a host sync; the loop calls it where it syncs anyway), report
        the skipped steps, raise NonFiniteStepsError after --max_bad_steps in a row."""
        skipped = self.nonfinite.settle()
        if skipped:
            self.reporter.message(
                f"skipped step(s) {', '.join(map(str, skipped))}: loss or gradient norm not finite "
                f"({self.nonfinite.skipped_steps} skipped so far)"
            )

    def log(self, steps: int, seconds: float) -> dict[str, float]:
        """Reduce the interval's metrics over ranks and report them (every rank must call this).

        ``data_wait_ms`` is the time a step blocked on its batch (averaged over the interval's steps and the
        ranks), ``data_wait_share`` that time's share of the interval's wall time."""
        self.settle_nonfinite()
        self.metrics.add_scalar("data_wait_s", self.data_wait / max(steps, 1))
        self.data_wait = 0.0
        values = {
            "step": self.step,
            "samples": self.step * self.global_batch,
            "lr": self.optimizer.param_groups[0]["lr"],
            **self.metrics.reduce(),
            "images_per_s": steps * self.global_batch / max(seconds, 1e-9),
            "peak_mem_gib": max_over_ranks(peak_memory_gib(self.ctx.device), self.ctx.device),
        }
        data_wait = values.pop("data_wait_s")
        values["data_wait_ms"] = 1000.0 * data_wait
        values["data_wait_share"] = data_wait * steps / max(seconds, 1e-9)
        applied_share = values.pop("grad_norm_count", 0.0)  # grad_norm averages the applied steps only
        if "grad_norm" in values:
            values["grad_norm"] = values["grad_norm"] / applied_share if applied_share else float("nan")
        values["skipped_steps"] = self.skipped_steps
        if self.scaler is not None:
            values.update(loss_scale=self.scaler.get_scale())
        self.reporter.metrics(values)
        return values

    def write_preview(self) -> None:
        """Rank 0 writes a grid of EMA samples (other ranks go on; they wait at the next collective)."""
        self.last_preview_step = self.step
        if self.preview is not None and self.ctx.is_main:
            path = self.preview.write(self.ema, self.settings.log_dir, self.step)
            self.reporter.message(f"wrote samples {path}")

    def evaluate(self) -> None:
        """Score EMA samples (every rank takes part) and report the metrics; see training/quality.py."""
        values = self.evaluation.run(self.ema, self.model, self.step)
        self.reporter.metrics({"step": self.step, **values})

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        """Write model, EMA, optimizer and full-state files for this step (rank 0; every rank must call)."""
        self.settle_nonfinite()
        rng_states = dist_util.all_gather_object(capture_rng_state(self.ctx.device))
        error = None
        if self.ctx.is_main:
            try:
                self._write_checkpoint(rng_states)
            except OSError as problem:  # every rank stops with rank 0's error instead of waiting
                error = problem
        error = dist_util.broadcast_object(error)
        if error is not None:
            raise error
        self.last_saved_step = self.step

    def _state_registry(self) -> StateRegistry:
        """The parts of a full training state, each with how it saves and loads (see training/state.py).
        Each looks its part up when called: a resume from improved-diffusion's files replaces the EMA."""
        registry = StateRegistry()
        registry.register("step", lambda: self.step, self._set_step)
        registry.register(
            "skipped_steps", lambda: self.skipped_steps, self._set_skipped_steps, required=False
        )
        registry.register("world_size", lambda: self.ctx.world_size, self._set_saved_world_size)
        registry.register("global_batch", lambda: self.global_batch, lambda _: None, required=False)
        registry.register("run_config", self.config.to_dict, lambda _: None, required=False)
        registry.register("model", lambda: _cpu_copy(self.model.state_dict()), self._load_model)
        registry.register(
            "optimizer", lambda: self.optimizer.state_dict(), lambda s: self.optimizer.load_state_dict(s)
        )
        registry.register("scaler", self._scaler_state, self._load_scaler, required=False)
        registry.register("ema", lambda: self.ema.state_dict(), lambda s: self.ema.load_state_dict(s))
        registry.register(
            "schedule_sampler",
            lambda: self.schedule_sampler.state_dict(),
            lambda s: self.schedule_sampler.load_state_dict(s),
        )
        registry.register("data", lambda: self.data.state_dict(), lambda s: self.data.load_state_dict(s))
        registry.register("rng", lambda: self._rng_states, self._restore_rng)
        if self.evaluation is not None:
            registry.register(
                "evaluation", self.evaluation.state_dict, self.evaluation.load_state_dict, False
            )
        return registry

    def _set_step(self, step: int) -> None:
        self.step = int(step)

    def _set_skipped_steps(self, count: int) -> None:
        self.nonfinite.skipped_steps = int(count)

    def _set_saved_world_size(self, world_size: int) -> None:
        self._saved_world_size = int(world_size)

    def _load_model(self, state: dict) -> None:
        self.model.load_state_dict(state, strict=True)

    def _scaler_state(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def _load_scaler(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def _restore_rng(self, states: list) -> None:
        """This rank's generators as saved, when the state has as many ranks as this run; else re-seeded."""
        if self._saved_world_size == self.ctx.world_size:
            restore_rng_state(states[self.ctx.rank], self.ctx.device)
            return
        seed_everything(self.config.runtime.seed + self.step, self.ctx.rank)
        self.reporter.message(
            f"note: the state was written by {self._saved_world_size} ranks, this run has "
            f"{self.ctx.world_size}: data order and per-step noise continue exactly, dropout randomness is "
            "re-seeded"
        )

    def _write_checkpoint(self, rng_states: list) -> None:
        """Rank 0 writes this step's files (see checkpoint.py for the order)."""
        directory = self.settings.log_dir
        self._rng_states = rng_states
        state = {"format": STATE_FORMAT, "version": STATE_VERSION, **self.state.state_dict()}
        atomic_save(state["model"], f"{directory}/{model_filename(self.step)}")
        for index, rate in enumerate(self.ema.rates):
            ema_state = _cpu_copy(self.ema.model_state_dict(self.model, index))
            atomic_save(ema_state, f"{directory}/{ema_filename(rate, self.step)}")
        atomic_save(state["optimizer"], f"{directory}/{opt_filename(self.step)}")
        atomic_save(state, f"{directory}/{state_filename(self.step)}")
        prune_states(directory, self.settings.keep_states)
        self.reporter.message(f"saved checkpoint for step {self.step} in {directory}")

    def resume(self) -> None:
        """Load the resume source, if any (an explicit path, else the newest full state in the log dir)."""
        source = find_resume_source(self.settings.resume_checkpoint, self.settings.log_dir, self.ema.rates)
        if source is None:
            return
        if source.kind == "state":
            self._load_state(source.path)
        else:
            self._load_model_files(source)
        self.last_saved_step = self.step
        self.reporter.message(f"resumed from {source.path} at step {self.step}")

    def _load_state(self, path: str) -> None:
        state = dist_util.load_file(path, trust=self.config.runtime.trust_checkpoint)
        differences = check_training_state(
            path,
            state,
            required=self.state.required,
            model=self.model,
            optimizer=self.optimizer,
            ema_rates=self.ema.rates,
            schedule_sampler=self.schedule_sampler,
            dataset_len=len(self.data.dataset),
            model_flags=self.config.model_flags(),
        )
        if differences:
            self.reporter.message(
                f"warning: resuming with flags that differ from {path}: {'; '.join(differences)}"
            )
        self.state.load_state_dict(state)

    def _load_model_files(self, source: ResumeSource) -> None:
        trust = self.config.runtime.trust_checkpoint
        load_model_state(self.model, dist_util.load_file(source.path, trust=trust), source.path)
        if source.opt_path:
            self.optimizer.load_state_dict(dist_util.load_file(source.opt_path, trust=trust))
        self.ema = ParameterEMA(self.model, self.settings.ema_rates, warmup=self.settings.ema_warmup)
        self.ema.num_updates = source.step
        for index, ema_path in enumerate(source.ema_paths):
            if ema_path:
                self.ema.load_rate_from_model_state(index, dist_util.load_file(ema_path, trust=trust))
        self.step = source.step
        steps_per_epoch = len(self.data.dataset) // self.global_batch
        self.data.load_state_dict(
            {
                "epoch": self.step // steps_per_epoch,
                "offset": (self.step % steps_per_epoch) * self.global_batch,
                "seed": self.data.seed,
                "dataset_len": len(self.data.dataset),
            }
        )
        seed_everything(self.config.runtime.seed + self.step, self.ctx.rank)
