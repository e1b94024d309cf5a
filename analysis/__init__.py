"""The analysis step: what a search did and what it found.

`results` gathers a Ray Tune experiment folder into pandas tables, `plots` draws them with seaborn, `report`
writes the executed notebook report, `retrain` builds and tests the final model. Command line:
`python -m analysis --help`.
"""
