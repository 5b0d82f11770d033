"""Run `align` commands in forked children, each one killed with SIGKILL at a chosen moment (a test helper).

    python tests/fault_driver.py PLAN.json RESULT.json

The driver imports the heavy libraries once, then forks a fresh child per step, so a dozen kill points cost one
interpreter start-up. A child installs its kill point, runs the command through the real typer app and exits;
nothing in the library knows about it. Kill points (``"kill"`` of a step; ``"when"`` is ``"before"`` or
``"after"`` the call, ``"nth"`` counts matching calls from 1):

* ``{"replace": "step-0000045.json"}``: the ``nth`` ``os.replace`` whose destination's name matches this glob,
  i.e. the moment an atomic write (``align.files``, the cache's arrays, plots) makes its file appear;
* ``{"call": "align.optim.sam:SAM.second_step"}``: the ``nth`` call of a module's function or class method.

PLAN: ``{"preload": [modules], "threads": 1, "steps": [{"argv": [...], "kill": {...} | null, "log": path}]}``.
RESULT: ``{"seconds"}`` of the imports, then one ``{"killed": bool, "code": exit code or None, "seconds"}`` per
step. The driver itself never runs torch
operations: forking a process whose OpenMP pool is running is unsafe.
"""
from __future__ import annotations

import fnmatch
import importlib
import json
import os
import signal
import sys
import time


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit, no finally: like a power cut


def _hook(call, matches, spec: dict):
    """``call`` wrapped so that the ``nth`` call for which ``matches(*args)`` holds dies before or after it."""
    seen = [0]

    def wrapper(*args, **kwargs):
        hit = False
        if matches(*args, **kwargs):
            seen[0] += 1
            hit = seen[0] == spec.get("nth", 1)
        if hit and spec.get("when", "before") == "before":
            _die()
        result = call(*args, **kwargs)
        if hit:
            _die()
        return result

    return wrapper


def install(spec: dict) -> None:
    """Arm one kill point in this process."""
    if "replace" in spec:
        os.replace = _hook(os.replace, lambda src, dst, *a, **k: fnmatch.fnmatch(os.path.basename(dst),
                                                                                 spec["replace"]), spec)
        return
    module_name, _, attr = spec["call"].partition(":")
    owner = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, name, _hook(getattr(owner, name), lambda *a, **k: True, spec))


def child(step: dict, threads: int) -> None:
    """In the forked child: redirect output, arm the kill point, run the command, exit with its code."""
    log = os.open(step["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    import torch

    torch.set_num_threads(threads)
    # A study gives each cell cpu_count // workers threads; tiny tensors on shared cores run far faster on one.
    os.cpu_count = lambda: threads
    if step.get("kill"):
        install(step["kill"])
    from align.cli.main import app

    code = 0
    try:
        app(args=step["argv"], prog_name="align")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # a traceback is a failure the test must see
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(plan_path: str, result_path: str) -> None:
    started = time.perf_counter()
    plan = json.loads(open(plan_path, encoding="utf-8").read())
    # torch._dynamo: the optimizers import it on their first step (≈5 s); every child would pay for it again
    for module in ["align.cli.main", "align.train.loop", "align.study.compare", "align.cache.write", "align.metrics.measure",
                   "torch._dynamo",
                   *plan.get("preload", [])]:
        importlib.import_module(module)
    results = [{"seconds": round(time.perf_counter() - started, 2)}]  # the imports
    for step in plan["steps"]:
        sys.stdout.flush()
        began = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            child(step, plan.get("threads", 1))
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        results.append({"killed": killed, "code": None if killed else os.waitstatus_to_exitcode(status),
                        "seconds": round(time.perf_counter() - began, 2)})
    with open(result_path, "w", encoding="utf-8") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main(*sys.argv[1:3])
