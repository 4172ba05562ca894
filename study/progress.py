"""Live progress of a study: one short line per event, instead of a wall of Ray logs.

    [ 3/14 swwae-all s0] finetune epoch 2/5  loss 0.412  val_top1 12.30%   | 2 done, 2 running, ETA 6m10s
"""

from __future__ import annotations

import sys
import time

from ray import tune  # [ray] the callback interface


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress(tune.Callback):
    def __init__(self, total_trials: int, stage_epochs: dict[str, int], stream=None):
        self.total = total_trials
        self.stage_epochs = stage_epochs
        self.stream = stream or sys.stdout
        self.start = time.time()
        self.done = 0
        self.running: set[str] = set()
        self.labels: dict[str, str] = {}
        self.numbers: dict[str, int] = {}

    def __getstate__(self):
        return {"total": self.total, "stage_epochs": self.stage_epochs}

    def __setstate__(self, state):
        self.__init__(state["total"], state["stage_epochs"])

    def setup(self, **info):
        self.start = time.time()

    def _label(self, trial) -> str:
        if trial.trial_id not in self.numbers:
            self.numbers[trial.trial_id] = len(self.numbers) + 1
        return f"[{self.numbers[trial.trial_id]:>2}/{self.total} {self.labels.get(trial.trial_id, trial.config.get('model', '?'))}]"

    def _tail(self) -> str:
        eta = ""
        if self.done:
            per_trial = (time.time() - self.start) / self.done
            remaining = max(self.total - self.done, 0)
            eta = f", ETA {_duration(per_trial * remaining / max(len(self.running), 1))}" if remaining else ""
        return f"| {self.done} done, {len(self.running)} running{eta}"

    def print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        event = result.get("event")
        if event == "trial_start":
            self.labels[trial.trial_id] = f"{result['model']} s{result['seed']}"
            self.print(f"{self._label(trial)} started: {len(result['stage_keys'].split(','))} stages {self._tail()}")
        elif event == "epoch":
            total = self.stage_epochs.get(result["stage"], "?")
            parts = [f"{result['stage']} epoch {result['epoch']}/{total}", f"loss {result.get('loss', float('nan')):.4g}"]
            if "val_top1_err" in result:
                parts.append(f"val_top1 {result['val_top1_err']:.2f}%")
            self.print(f"{self._label(trial)} {'  '.join(parts)} {self._tail()}")
        elif event == "stage_done":
            how = "reused from the store" if result["reused"] else "computed"
            self.print(f"{self._label(trial)} {result['stage']} {how}")
        elif event == "seed_end":
            self.print(f"{self._label(trial)} finished: train_top1 {result['train_top1_err']:.2f}%  "
                       f"val_top1 {result['val_top1_err']:.2f}%")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done += 1

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done += 1
        self.print(f"{self._label(trial)} FAILED (see {trial.error_file}) {self._tail()}")
