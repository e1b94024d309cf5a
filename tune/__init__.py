"""The Ray Tune layer: `python tune/run.py` searches LoRA sentiment classifiers with ASHA and Optuna.

Modules: `config` (TuneArguments, search space, presets, the command line), `search` (searcher, scheduler,
param space), `trainable` (the per-trial function), `cluster` (Ray session, resource plan, storage), `run`
(the entry point). `lorasent` itself never imports Ray; only this package does.
"""
