"""Live progress of a study: one short line per event, instead of a wall of Ray logs.

    [ 3/14 swwae-all s0] finetune epoch 2/5  loss 0.412  val_top1 12.30%   | 2 done, 2 running, ETA 6m10s

Trials are numbered in the order Tune created them, which a resumed study keeps; done and running counts come from Tune's trial
states, so they continue across a resume too.
"""

from __future__ import annotations

import sys
import time

from ray import tune  # [ray] the callback interface

from .plan import trial_config


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress(tune.Callback):
    def __init__(self, total_trials: int, stage_epochs: dict[str, int], stream=None):
        self.total = total_trials
        self.stage_epochs = stage_epochs
        self.stream = stream or sys.stdout
        self.start = time.time()
        self.done_here = 0  # trials finished by this launcher (for the ETA)
        self.trials: list = []
        self.labels: dict[str, str] = {}

    def __getstate__(self):
        return {"total": self.total, "stage_epochs": self.stage_epochs}

    def __setstate__(self, state):
        self.__init__(state["total"], state["stage_epochs"])

    def setup(self, **info):
        self.start = time.time()

    def _label(self, trial) -> str:
        ids = sorted(t.trial_id for t in self.trials)  # ids count up in creation order; a restore keeps them
        number = ids.index(trial.trial_id) + 1 if trial.trial_id in ids else "?"
        return f"[{number:>2}/{self.total} {self.labels.get(trial.trial_id, trial_config(trial.config).get('model', '?'))}]"

    def _tail(self) -> str:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in self.trials)
        running = sum(t.status == "RUNNING" for t in self.trials)
        eta = ""
        if self.done_here:
            per_trial = (time.time() - self.start) / self.done_here
            remaining = max(self.total - done, 0)
            eta = f", ETA {_duration(per_trial * remaining / max(running, 1))}" if remaining else ""
        return f"| {done} done, {running} running{eta}"

    def print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.trials = trials

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.trials = trials
        event = result.get("event")
        if event == "trial_start":
            self.labels[trial.trial_id] = f"{result['model']} s{result['seed']}"
            self.print(f"{self._label(trial)} started: {len(result['stage_keys'].split(','))} stages {self._tail()}")
        elif event == "epoch" and not result.get("replayed"):  # a stored curve replayed for the scheduler
            total = self.stage_epochs.get(result["stage"], "?")
            parts = [f"{result['stage']} epoch {result['epoch']}/{total}", f"loss {result.get('loss', float('nan')):.4g}"]
            if "val_top1_err" in result:
                parts.append(f"val_top1 {result['val_top1_err']:.2f}%")
            self.print(f"{self._label(trial)} {'  '.join(parts)} {self._tail()}")
        elif event == "stage_done":
            how = "reused from the store" if result["reused"] else "computed"
            if not result["reused"] and result.get("why"):
                how += f" ({result['why']})"  # not in the store / corrupt / code semantics version changed
            self.print(f"{self._label(trial)} {result['stage']} {how}")
        elif event == "stage_retry":
            self.print(f"{self._label(trial)} {result['stage']} retried from its checkpoint after epoch "
                       f"{result['epoch']} (a worker failed, or the study was resumed)")
        elif event == "seed_end":
            self.print(f"{self._label(trial)} finished: train_top1 {result['train_top1_err']:.2f}%  "
                       f"val_top1 {result['val_top1_err']:.2f}%")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.trials = trials
        self.done_here += 1

    def on_trial_error(self, iteration, trials, trial, **info):
        self.trials = trials
        self.done_here += 1
        self.print(f"{self._label(trial)} FAILED (see {trial.error_file}) {self._tail()}")
