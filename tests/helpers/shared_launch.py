"""One launch per TP size for every test module that compares ``dstp.load`` with HF.

Starting ranks is the expensive part of these tests on a small machine (each rank
imports torch, transformers and DeepSpeed and joins the group: tens of seconds per
launch on 2 cores), so the modules that run the same worker
(``tests/helpers/workers/policy_forward.py``) share its launches: each module
registers, at import, a function that saves its checkpoints and returns its job
entries; the first test that asks for a TP size's results builds the entries of every
registered module with a selected test and launches once for all of them. TP=2 goes
through the real ``deepspeed`` launcher, TP=4 through plain rank processes
(:func:`tests.helpers.launcher.run_ranks`), as users start them.

An entry may say ``"tps": [2]`` to run at some TP sizes only. Entry names are shared
by all modules, so they must be unique.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.launcher import run_deepspeed, run_ranks

WORKER = "tests/helpers/workers/policy_forward.py"

Builder = Callable[[Path], dict[str, dict[str, Any]]]
_BUILDERS: dict[str, Builder] = {}  # module name -> its builder
_ENTRIES: dict[str, dict[str, dict[str, Any]]] = {}  # module name -> built entries
_RUNS: dict[int, Launch] = {}


@dataclass
class Launch:
    """One TP size's run: where the worker wrote, what it ran, how it ended."""

    tp: int
    out: Path
    names: list[str]
    procs: list[subprocess.CompletedProcess]
    leaked_shm: list[str]

    def check(self) -> None:
        for proc in self.procs:
            assert proc.returncode == 0, (proc.stdout or "")[-4000:] + (proc.stderr or "")[-3000:]


def register(module: str, build: Builder) -> None:
    """``module`` (its ``__name__``) takes part in the shared launches with ``build``'s
    entries; ``build(root)`` saves its checkpoints under ``root``."""
    _BUILDERS[module] = build


def entries(module: str, tmp_path_factory: Any) -> dict[str, dict[str, Any]]:
    """``module``'s entries, its checkpoints saved once per session."""
    if module not in _ENTRIES:
        root = tmp_path_factory.mktemp(module.rpartition(".")[2])
        _ENTRIES[module] = _BUILDERS[module](root)
    return _ENTRIES[module]


def _selected_modules(request: Any) -> list[str]:
    """Registered modules with a test in this session (narrowed by -k, paths, ...)."""
    running = {item.module.__name__ for item in request.session.items if item.module}
    chosen = [m for m in _BUILDERS if m in running]
    return chosen or [request.module.__name__]


def _shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def launch(tp: int, request: Any) -> Launch:
    """The results at ``tp`` for every selected module's entries (launched once)."""
    if tp in _RUNS:
        return _RUNS[tp]
    factory = request.getfixturevalue("tmp_path_factory")
    models: dict[str, dict[str, Any]] = {}
    for module in _selected_modules(request):
        for name, entry in entries(module, factory).items():
            if tp not in entry.get("tps", (tp,)):
                continue
            assert name not in models, f"entry {name!r} is in two modules' jobs"
            models[name] = entry
    out = factory.mktemp(f"launch_tp{tp}")
    job = out / "job.json"
    job.write_text(json.dumps({"models": models, "prompt": [[1]], "new_tokens": 1}))
    args = [WORKER, str(job), str(out)]
    before = _shm_segments()
    procs = [run_deepspeed(2, args, timeout=900)] if tp == 2 else run_ranks(tp, args, timeout=900)
    leaked = sorted(_shm_segments() - before)
    _RUNS[tp] = Launch(tp, out, list(models), procs, leaked)
    return _RUNS[tp]
