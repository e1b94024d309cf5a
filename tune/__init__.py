"""The Ray Tune layer: `python tune/run.py` searches LoRA sentiment classifiers with ASHA and Optuna.

Modules: `config` (TuneArguments, search space, presets, the command line), `search` (searcher, scheduler,
param space), `sampler` (no configuration proposed twice), `trainable` (the per-trial function), `engine` (trial
engines for --fused_trials), `reporting` (an epoch to Tune), `resumable` (what --resume adds to Ray's restore),
`cluster` (Ray session, resource plan, storage), `run` (the entry point). `lorasent` itself never imports Ray; only
this package does.
"""
