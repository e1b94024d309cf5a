"""Search algorithms that, on --resume, agree with the trials Ray Tune restores.

Ray saves an experiment in several files, one after another: the trials (experiment_state-*.json), then the searcher
(searcher-state-*.pkl: Optuna's study; search_gen_state-*.json: the trials its ConcurrencyLimiter counts as running,
how many trials were made; basic-variant-state-*.json for random and grid search), and a thread copies them to the
storage folder. A driver killed in between (SIGKILL, the OOM killer, a lost head node) leaves the searcher a snapshot
behind or ahead of the trials. Restored as it is, a searcher that still counts as running a trial which has finished
since never proposes another one once its concurrency limit is full: the resumed search waits forever (a killed search
in CI did). One behind by a trial also makes a trial too many, or random search the same trial again.

So once Ray has restored them, these bring the searcher in line with the saved trials that Ray restores: a trial that
finished since the searcher's snapshot is reported to it now (Optuna learns its result), one it proposed that was never
saved is reported failed (Ray will not run it), and the trials made are the ones saved."""

from __future__ import annotations

from ray.tune.experiment import Trial
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator

from tune.cluster import saved_trials

FINISHED = "TERMINATED"  # errored trials are not finished: --resume runs them again


class ResumableSearchGenerator(SearchGenerator):
    """Ray's wrapper of a searcher behind a ConcurrencyLimiter, made consistent with the saved trials on restore."""

    searcher: ConcurrencyLimiter

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        trials = saved_trials(dirpath)  # Ray has just copied the experiment's state files here, and restores them
        if trials is None:
            return
        saved = {trial.trial_id: trial for trial in trials}
        limiter = self.searcher
        for trial_id in sorted(limiter.live_trials):
            trial = saved.get(trial_id)
            if trial is not None and trial.status != FINISHED:
                continue  # Ray runs it on, and its end reaches the searcher as usual
            try:
                if trial is None:  # proposed after the trials were saved: Ray does not know it
                    limiter.on_trial_complete(trial_id, error=True)
                else:  # finished after the searcher was saved: the result it missed
                    limiter.on_trial_complete(trial_id, result=trial.last_result)
            except KeyError:  # the searcher's own file is older still: it never proposed this trial
                limiter.live_trials.discard(trial_id)
        self._counter = len(trials)


class ResumableVariantGenerator(BasicVariantGenerator):
    """Ray's random and grid search, made consistent with the saved trials on restore: a trial that has finished, or
    was never saved, no longer counts against --max_concurrent_trials, and a trial it makes again (its state a
    snapshot behind: the same id, from the same variant) is dropped, as Ray restores the saved one. A trial it made
    that was never saved is not made again (its variant is gone with it): the search runs one trial fewer."""

    _saved: frozenset[str] = frozenset()

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        trials = saved_trials(dirpath)
        if trials is not None:
            self._live_trials &= {trial.trial_id for trial in trials if trial.status != FINISHED}
            self._saved = frozenset(trial.trial_id for trial in trials)

    def next_trial(self) -> Trial | None:
        trial = super().next_trial()
        while trial is not None and trial.trial_id in self._saved:
            self._live_trials.discard(trial.trial_id)
            trial = super().next_trial()
        return trial
