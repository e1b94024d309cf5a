"""lorasent: LoRA fine-tuning of transformer sentiment classifiers.

Importable without Ray. The pieces: `config` (what to run), `data` (reviews in, tokenised splits out),
`model` (encoder + LoRA adapter, save and load), `train` (one `Trainer` run), `metrics`, `evaluate`
and `predict`.
"""

__version__ = "0.1.0"
