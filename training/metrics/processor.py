"""The metrics processor: the trainer hands it every step's result; it keeps the run's progress
(history, throughput clock, stage times), rolls the logging intervals over (their routing statistics
reduced over ranks, collapse warnings), and writes rank 0's run log (metrics.jsonl, TensorBoard,
W&B: training/metrics/run_log.py) and progress display (training/metrics/progress.py)."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from parallel.all_to_all import CommCounter, collective
from training.config import RunConfig
from training.guards import CollapseDetector
from training.metrics.interval import IntervalStats, Span, interval_record
from training.metrics.progress import NoProgress, ProgressMode, build_progress
from training.metrics.records import RunProgress, StepResult
from training.metrics.run_log import NoRunLog, RunLog

WARMUP_STEPS = 3  # first steps left out of throughput and stage timing (first calls, allocator)


class MetricsProcessor:
    """Per train() call: :meth:`open` at its first step, :meth:`step_done` after each step,
    :meth:`close` at its end. ``interval`` gathers the routing statistics of the current logging
    interval on the device (the trainer's step adds to it)."""

    def __init__(self, cfg: RunConfig, *, rank: int, world_size: int, device: torch.device, comm: CommCounter,
                 display: ProgressMode = "off", run_id: str = "") -> None:
        self.cfg, self.rank, self.world_size, self.device, self.comm = cfg, rank, world_size, device, comm
        self.display: ProgressMode = display if rank == 0 else "off"
        self.run_id = run_id
        tc = cfg.train
        self.layer_names = [f"block{b}" for b in cfg.model.moe_blocks]
        self.progress = RunProgress()
        self.collapse = CollapseDetector(tc.collapse_share, tc.collapse_intervals, self.layer_names)
        self.interval = IntervalStats()
        self.last_stages: dict[str, float] = {}  # seconds per stage of the interval's sampled step
        self._bar, self._log = NoProgress(), NoRunLog()
        self._span = Span(0, time.perf_counter(), comm)
        self._end = tc.steps

    # ------------------------------------------------------------ a train() call
    def open(self, step: int, end: int) -> None:
        """Training continues at ``step`` and stops at ``end``: a fresh interval, log and display."""
        tc = self.cfg.train
        self._end = end
        self.interval = IntervalStats()
        self._bar = build_progress(self.display, self.cfg.name, step, tc.steps)
        self._log = self._open_run_log(step)
        self._span = Span(step, time.perf_counter(), self.comm)

    def sampled(self, s: int) -> bool:
        """Whether step ``s`` measures its stage breakdown: one step per logging interval."""
        tc = self.cfg.train
        return tc.stage_timing == "sampled" and s >= WARMUP_STEPS and (s - WARMUP_STEPS) % tc.log_every == 0

    def add_stages(self, stages: dict[str, float]) -> None:
        """A step's seconds per stage (empty unless the step was sampled)."""
        self.progress.add_stages(stages)
        if stages:
            self.last_stages = stages

    def step_done(self, s: int, r: StepResult, seconds: float) -> None:
        """Step ``s`` finished (skipped or not) in ``seconds``: history and clocks (warm-up steps are not
        timed); at a logging step the interval's record; the progress display."""
        tc = self.cfg.train
        self.progress.record(r, tc.lr_at(s), seconds if s >= WARMUP_STEPS else None)
        done = s + 1
        if done % tc.log_every == 0 or done == self._end:
            record = self._log_interval(done, r)
            self.interval, self._span = IntervalStats(), Span(done, time.perf_counter(), self.comm)
            self.last_stages = {}  # the next interval's sampled step fills it
            if record is not None:
                self._log.write(record)
                self._bar.logged(record)
        self._bar.update(r, self.progress.samples_per_s(tc.p * tc.k))

    def close(self) -> None:
        self._bar.close()
        self._log.close()

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """What a checkpoint keeps of the metrics (training/checkpoint/checkpointer.py)."""
        return {**self.progress.state_dict(), "collapse_events": self.collapse.events}

    def load_state_dict(self, client: dict) -> None:
        self.progress = RunProgress.from_state_dict(client)
        self.collapse.events = list(client.get("collapse_events", []))

    # ------------------------------------------------------------------- parts
    def _open_run_log(self, step: int):
        """Rank 0's metrics.jsonl / TensorBoard / W&B writers, continuing from ``step``."""
        if self.rank != 0:
            return NoRunLog()
        tc = self.cfg.train
        return RunLog(self.cfg.run_dir, step, wandb_project=tc.wandb_project, run_name=self.cfg.name,
                      run_id=self.run_id, config=self.cfg.to_dict())

    def _log_interval(self, step: int, last: StepResult) -> dict | None:
        """A logging step: the interval's routing statistics, summed over ranks, read on the host, into
        the history and the collapse check; returns the step's metrics record (interval_record)."""
        interval = self.interval
        if interval.steps == 0:
            return None
        reduced = interval.packed().to(self.device)
        if self.world_size > 1:
            collective("all-reduce of the interval's routing statistics", dist.all_reduce, reduced, host_reads=True)
        got = interval.unpack(reduced.cpu(), self.world_size)
        self._add_history(step, got)
        tc, span, h = self.cfg.train, self._span, self.progress.history
        return interval_record(
            step=step, result=last, lr=h.lr[-1], seconds=time.perf_counter() - span.t0,
            steps=step - span.step, total_steps=tc.steps, samples_per_step=tc.p * tc.k,
            stages_s=self.last_stages,
            layer_names=self.layer_names, load=got["load"], dropped=got["dropped"], active=got["active"],
            a2a_bytes=span.a2a_bytes(self.comm), coverage=got["coverage"])

    def _add_history(self, step: int, got: dict) -> None:
        """An interval's reduced statistics into the history; collapse warnings (said by rank 0)."""
        h = self.progress.history
        h.load_steps.append(step)
        h.load.append(got["load"])
        h.fusion_load.append(got["fusion"])
        h.dropped.append(float(np.mean(got["dropped"])) if got["dropped"] else 0.0)
        h.active.append(got["active"])
        h.coverage.append(got["coverage"])
        for msg in self.collapse.update(step, h.load[-1]):
            self.progress.warnings.append(msg)
            if self.rank == 0:
                print(f"warning: {msg}", flush=True)
