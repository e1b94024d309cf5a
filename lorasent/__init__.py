"""lorasent: LoRA fine-tuning of transformer sentiment classifiers.

Importable without Ray. The pieces: `config` (what to run), `data` (reviews in, labelled splits out),
`tokenize` (tokenised splits, cached on disk), `model` (encoder + LoRA adapter, save and load), `train` (one
`Trainer` run), `metrics`, `evaluate`, `predict`, `serve` (predictions over HTTP) and `export` (a plain transformers
model, the adapter merged in); `cpus` counts the CPUs a container lets this process use; `device_reads` finds the GPU
syncs of a piece of code on any device.
"""

__version__ = "0.1.0"
