"""How a trial's epoch reaches Tune: its metrics (the search metric first) and its model folder as the checkpoint.

Shared by both ways a trial trains (its own `Trainer` in `tune.trainable`, or an engine's shared base in
`tune.engine`); it imports neither torch nor transformers' models, so an engine's light trial processes stay light.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import ray
from ray import tune

LEADING_METRICS = ("f1_macro", "loss", "train_loss")  # after the search metric: the console table shows the first 4


def epoch_reporter(metric: str, mode: str) -> Callable[[dict[str, float], Path], None]:
    """Report each epoch's metrics (search metric first) and its model folder as the trial's checkpoint.

    Every report also names the Ray node that ran the trial (`node_id`): Tune's own `hostname` and `node_ip` cannot
    tell nodes apart that share a machine, and a retried trial may move to another node.
    """
    worst = -math.inf if mode == "max" else math.inf
    node_id = ray.get_runtime_context().get_node_id()

    def report(epoch_metrics: dict[str, float], checkpoint_dir: Path) -> None:
        metrics = dict(epoch_metrics)
        if metrics.get("diverged"):
            metrics[metric] = worst  # a NaN/inf-loss model must never be picked as best, whatever it predicts
        order = [metric, *(k for k in LEADING_METRICS if k != metric)]
        ordered = {k: metrics[k] for k in order if k in metrics} | metrics | {"node_id": node_id}
        tune.report(ordered, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    return report
