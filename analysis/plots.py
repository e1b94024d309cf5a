"""Seaborn figures of a search, one function per question the report asks.

Every function takes an `Experiment` (or evaluation results) and returns a `matplotlib.figure.Figure` built
without pyplot's global state, so a notebook shows each figure exactly once (as its cell's value) and a
script can `fig.savefig(...)` it. When a plot cannot be drawn (the search did not vary that parameter, too
few trials), the figure says so instead of raising: a report of a small or half-finished search still renders.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatterSciNotation

from analysis.results import Experiment, compute_spent, importance_note, param_importances

sns.set_theme(style="whitegrid", context="notebook")

LEARNING_RATE, BATCH_SIZE, LORA_RANK = "learning_rate", "per_device_train_batch_size", "lora_r"
_MAX_LEGEND_TRIALS = 12


def _figure(ncols: int = 1, width: float = 7.0, height: float = 4.5) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, list(np.atleast_1d(fig.subplots(1, ncols)))


def note_figure(text: str) -> Figure:
    """A small figure holding only a message, for plots the data cannot support.

    The message sits on a hidden axes: IPython shows a figure without axes as its repr ('<Figure size 700x120 with
    0 Axes>'), never as an image, so the message would be lost in the notebook.
    """
    fig = Figure(figsize=(7, 1.2))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=11)
    return fig


def _unscored(exp: Experiment) -> Figure | None:
    """A note figure when no trial has a score to plot yet (all pending, errored or diverged), else None."""
    if exp.scored_trials.empty:
        return note_figure(f"No trial has a usable '{exp.metric}' score to plot.")
    return None


def _metric_label(exp: Experiment) -> str:
    return f"validation {exp.metric} (best epoch)"


def _columns(exp: Experiment, *names: str) -> list[str] | None:
    """Config columns of the named hyperparameters, or None if the search lacks any of them."""
    columns = [exp.param(n) for n in names]
    return None if None in columns else columns  # type: ignore[return-value]


def learning_curves(exp: Experiment) -> Figure:
    """Validation metric and loss per epoch of every trial; an X where ASHA stopped a trial, a star at the best."""
    if (note := _unscored(exp)) is not None:
        return note
    losses = [m for m in ("loss", "train_loss") if m in exp.epochs and m != exp.metric]
    panels = [exp.metric, *losses[:1]]
    fig, axes = _figure(len(panels))
    order = exp.trials.sort_values("rank")["trial_id"].tolist()
    palette = dict(zip(order, sns.color_palette("viridis", len(order)), strict=True))
    stopped = exp.trials.loc[exp.trials["early_stopped"], "trial_id"]
    for ax, metric in zip(axes, panels, strict=True):
        data = exp.epochs[np.isfinite(exp.epochs[metric].astype(float))]  # a diverged epoch reports inf or NaN
        sns.lineplot(
            data=data,
            x="epoch",
            y=metric,
            hue="trial_id",
            hue_order=order,
            palette=palette,
            marker="o",
            markersize=4,
            ax=ax,
            legend=False,
        )
        last = data.sort_values("epoch").groupby("trial_id").tail(1)
        ends = last[last["trial_id"].isin(stopped)]
        ax.scatter(ends["epoch"], ends[metric], marker="X", s=90, color="crimson", zorder=5)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {metric}" if metric != "train_loss" else "training loss")
        ax.xaxis.get_major_locator().set_params(integer=True)
    best = exp.best_trial
    axes[0].scatter(
        [best["best_epoch"]], [best[exp.best_column]], marker="*", s=260, color="gold", edgecolor="black", zorder=6
    )
    stop_marker = Line2D([], [], marker="X", color="crimson", linestyle="", markersize=9, label="stopped early by ASHA")
    handles = [
        *([stop_marker] if exp.early_stopping else []),
        Line2D(
            [],
            [],
            marker="*",
            color="gold",
            markeredgecolor="black",
            linestyle="",
            markersize=14,
            label=f"best: trial {best['trial_id']}",
        ),
    ]
    if len(order) <= _MAX_LEGEND_TRIALS:
        trials = exp.trials.set_index("trial_id")
        handles += [Line2D([], [], color=palette[t], label=_curve_label(t, trials.loc[t])) for t in order]
    fig.legend(handles=handles, loc="outside right upper", fontsize=9, title="trial (rank)")
    stops = f"{len(stopped)} stopped early" if exp.early_stopping else "no early stopping"
    fig.suptitle(f"Learning curves of {len(order)} trials ({stops}, max {exp.max_epochs} epochs)")
    return fig


def _curve_label(trial_id: str, trial: pd.Series) -> str:
    """A trial's legend entry: its rank (none before a finite score), and whether it diverged or failed."""
    rank = "no score" if pd.isna(trial["rank"]) else f"#{int(trial['rank'])}"
    ended = ", diverged" if trial["diverged"] else ", ERROR" if trial["status"] == "ERROR" else ""
    return f"{trial_id} ({rank}{ended})"


def lr_vs_metric(exp: Experiment) -> Figure:
    """Learning rate against the best validation metric, coloured by batch size, marker and size by LoRA rank."""
    columns = _columns(exp, LEARNING_RATE)
    if columns is None:
        return note_figure("The search did not vary the learning rate.")
    if (note := _unscored(exp)) is not None:
        return note
    data = exp.scored_trials
    batch, rank = exp.param(BATCH_SIZE), exp.param(LORA_RANK)
    fig, (ax,) = _figure(width=8)
    sns.scatterplot(
        data=data,
        x=columns[0],
        y=exp.best_column,
        hue=batch,
        style=rank,
        size=rank,
        sizes=(60, 240),
        palette="deep" if batch else None,  # seaborn warns of a palette without a hue
        ax=ax,
    )
    best = exp.best_trial
    ax.annotate("best", (best[columns[0]], best[exp.best_column]), xytext=(10, -4), textcoords="offset points")
    ax.set_xscale("log")
    # Label the ticks between powers of ten (at 2, 3, 4 and 6) only where no power of ten is in view: left unlabelled,
    # a range within a decade had no tick label at all; labelled beside one, their labels ran into each other. Decided
    # here from the limits, as matplotlib before 3.11 does not by itself.
    low, high = ax.get_xlim()
    decade_in_view = math.ceil(math.log10(low)) <= math.log10(high)
    ax.xaxis.set_minor_formatter(LogFormatterSciNotation(minor_thresholds=(0, 0) if decade_in_view else (1e9, 0)))
    ax.set_xlabel("learning rate (log)")
    ax.set_ylabel(_metric_label(exp))
    if ax.get_legend_handles_labels()[0]:  # none when the search varied neither batch size nor rank
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    ax.set_title("Learning rate vs validation metric")
    return fig


def _lr_bins(values: pd.Series, max_levels: int = 5) -> pd.Categorical:
    """Learning rates as ordered heatmap rows: the values themselves when few, else log-spaced ranges."""
    if values.nunique() <= max_levels:
        levels = sorted(values.unique())
        return pd.Categorical(values.map(lambda v: f"{v:.1e}"), [f"{v:.1e}" for v in levels], ordered=True)
    edges = np.logspace(np.log10(values.min()), np.log10(values.max()), max_levels + 1)
    edges[[0, -1]] = values.min(), values.max()  # exact ends: logspace's rounding must not drop the extremes
    labels = [f"{lo:.1e}–{hi:.1e}" for lo, hi in itertools.pairwise(edges)]
    return pd.cut(values, edges, labels=labels, include_lowest=True)


def lr_batch_heatmap(exp: Experiment) -> Figure:
    """Best validation metric in each learning-rate × batch-size cell (number of trials in brackets)."""
    columns = _columns(exp, LEARNING_RATE, BATCH_SIZE)
    if columns is None:
        return note_figure("The search did not vary both learning rate and batch size.")
    if (note := _unscored(exp)) is not None:
        return note
    lr, batch = columns
    data = exp.scored_trials.assign(lr_bin=lambda d: _lr_bins(d[lr]))
    table = {"index": "lr_bin", "columns": batch, "values": exp.best_column, "observed": True}
    best = data.pivot_table(**table, aggfunc=exp.mode)
    count = data.pivot_table(**table, aggfunc="count")
    annot = best.map(lambda v: "" if pd.isna(v) else f"{v:.3f}") + count.reindex_like(best).map(
        lambda n: "" if pd.isna(n) else f"\n({int(n)})"
    )
    fig, (ax,) = _figure(width=7, height=1.2 + 0.7 * len(best))
    sns.heatmap(
        best,
        annot=annot,
        fmt="",
        cmap="viridis" if exp.mode == "max" else "viridis_r",
        ax=ax,
        cbar_kws={"label": _metric_label(exp)},
    )
    ax.grid(False)
    ax.set_xlabel("batch size")
    ax.set_ylabel("learning rate")
    ax.set_title(f"Best {exp.metric} per learning rate × batch size (trials)")
    return fig


def rank_effect(exp: Experiment) -> Figure:
    """Best validation metric by LoRA rank: box per rank, one point per trial (red: stopped early by ASHA)."""
    columns = _columns(exp, LORA_RANK)
    if columns is None:
        return note_figure("The search did not vary the LoRA rank.")
    if (note := _unscored(exp)) is not None:
        return note
    data = exp.scored_trials.assign(stopped=lambda d: d["early_stopped"].map({True: "stopped early", False: "ran"}))
    fig, (ax,) = _figure()
    sns.boxplot(data=data, x=columns[0], y=exp.best_column, color="lightsteelblue", showfliers=False, ax=ax)
    state = np.random.get_state()
    np.random.seed(0)  # seaborn jitters with numpy's global generator: seeded, a re-run draws the same figure
    try:
        sns.stripplot(
            data=data,
            x=columns[0],
            y=exp.best_column,
            hue="stopped",
            hue_order=["ran", "stopped early"],
            palette={"ran": "navy", "stopped early": "crimson"},
            size=8,
            jitter=0.15,
            ax=ax,
        )
    finally:
        np.random.set_state(state)
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel(_metric_label(exp))
    ax.set_title("Effect of LoRA rank")
    return fig


def importance_plot(exp: Experiment, importances: pd.Series | None = None) -> Figure:
    """fANOVA hyperparameter importance (Optuna) as horizontal bars, or a note when it cannot be computed."""
    importances = param_importances(exp) if importances is None else importances
    if importances.empty:
        return note_figure(importance_note(exp))
    fig, (ax,) = _figure(height=1 + 0.5 * len(importances))
    sns.barplot(x=importances.to_numpy(), y=importances.index, color="steelblue", ax=ax)
    ax.set_xlabel(f"fANOVA importance for {exp.metric} (sums to 1)")
    ax.set_ylabel("")
    ax.set_title(f"Hyperparameter importance over {len(exp.scored_trials)} trials")
    return fig


def compute_plot(exp: Experiment, spent: pd.DataFrame | None = None) -> Figure:
    """Trial-epochs and device-hours of this search against no early stopping and the equivalent full grid."""
    spent = compute_spent(exp) if spent is None else spent
    hours = "gpu_hours" if exp.resources["gpu"] > 0 else "cpu_hours"
    fig, axes = _figure(2, width=6, height=3.5)
    for ax, column, label in ((axes[0], "trial_epochs", "trial-epochs"), (axes[1], hours, hours.replace("_", "-"))):
        sns.barplot(x=spent[column].to_numpy(), y=spent.index, hue=spent.index, palette="crest", ax=ax, legend=False)
        for container in ax.containers:
            ax.bar_label(container, fmt="%.3g", padding=3)
        ax.set_xlabel(label)
        ax.set_ylabel("")
    fig.suptitle(f"Compute spent: {spent['share_of_grid'].iloc[0]:.0%} of the full grid's trial-epochs")
    return fig


def confusion_matrix_plot(matrix: Sequence[Sequence[int]] | np.ndarray, label_names: Sequence[str]) -> Figure:
    """Confusion-matrix heatmap: rows true labels, columns predictions; counts and row shares."""
    counts = np.asarray(matrix)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    annot = np.vectorize(lambda c, s: f"{c}\n{s:.0%}")(counts, shares)
    fig, (ax,) = _figure(width=5, height=4)
    sns.heatmap(
        shares,
        annot=annot,
        fmt="",
        cmap="Blues",
        vmin=0,
        vmax=1,
        xticklabels=label_names,
        yticklabels=label_names,
        cbar_kws={"label": "share of true class"},
        ax=ax,
    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test)")
    return fig
