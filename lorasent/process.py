"""Garbage collection in lorasent's own processes: a search driver, its trial workers and engines, the command lines.

Importing torch, transformers, peft and Ray builds ~500k objects that live until the process ends. Python's garbage
collector walks them in every full collection, only to find nothing to free: ~7 times while they are imported
(1-2 s of a ~6 s import on a 2-core CPU), at each later full collection (~0.3 s), and once more at exit (1.5-2 s).
`gc.freeze()` moves the objects that exist into a generation no collection visits; what is made later is collected
as usual.
"""

from __future__ import annotations

import gc
import importlib
import sys
from collections.abc import Iterable
from typing import NoReturn


def import_modules(names: Iterable[str]) -> None:
    """Import `names` with collection paused; if this brought torch into the process (its start), freeze then.

    A process that had torch already (a test session, a notebook) is left unfrozen: it may hold garbage of models it
    trained, which a freeze would keep until it ends.
    """
    first = "torch" not in sys.modules
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in names:
            importlib.import_module(name)
    finally:
        if first and "torch" in sys.modules:
            gc.freeze()
        if enabled:
            gc.enable()


def exit_process(code: int) -> NoReturn:
    """`sys.exit(code)` without the interpreter's last collection over everything the process built. Exit handlers
    still run (Ray's shutdown, logging's flush), and reference counting still frees what is not in a cycle."""
    gc.freeze()
    sys.exit(code)
