"""lorasent.process in fresh processes: imports with collection paused then frozen, and an exit without the last
collection that still runs exit handlers and keeps the exit code."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap

from lorasent.process import import_modules


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_a_fresh_process_imports_without_collecting_then_freezes_what_the_imports_built() -> None:
    done = _python(
        """
        import gc, json, sys
        from lorasent.process import import_modules
        collections = []
        gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))
        import_modules(["lorasent.train"])
        print(json.dumps({"during": collections, "frozen": gc.get_freeze_count(), "enabled": gc.isenabled(),
                          "torch": "torch" in sys.modules}))
        """
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["torch"] and seen["enabled"]
    assert seen["during"] == []  # with collection on, importing torch and transformers runs hundreds
    assert seen["frozen"] > 100_000  # torch, transformers and peft's objects, out of every later collection


def test_a_process_that_had_torch_already_is_not_frozen() -> None:
    """Like this test session, which holds models earlier tests trained: a freeze would keep their garbage."""
    import torch  # noqa: F401

    frozen = gc.get_freeze_count()
    import_modules(["lorasent.fused"])
    assert gc.get_freeze_count() == frozen and gc.isenabled()


def test_exit_process_keeps_the_exit_code_and_runs_exit_handlers() -> None:
    done = _python(
        """
        import atexit, gc, sys
        from lorasent.process import exit_process
        atexit.register(lambda: print(f"exit handler ran, {gc.get_freeze_count()} objects frozen", flush=True))
        print("unflushed", end="")
        exit_process(3)
        """
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("unflushed") and "exit handler ran" in done.stdout
    assert int(done.stdout.split(", ")[1].split()[0]) > 0
