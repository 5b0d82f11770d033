"""One rank of a torchrun job in which one chosen rank dies with SIGKILL at a kill point (a test helper).

    torchrun --nproc-per-node 2 tests/rank_driver.py KILL_JSON KILL_RANK train --config ...

The rank whose RANK is KILL_RANK arms the kill point (those of tests/fault_driver.py: the nth ``os.replace`` onto
a file name, or the nth call of a function), then every rank runs the `align` command through the real typer app.
"""
from __future__ import annotations

import json
import os
import sys

from fault_driver import install


def main() -> None:
    spec, kill_rank, *argv = sys.argv[1:]
    if os.environ.get("RANK") == kill_rank:
        install(json.loads(spec))
    from align.cli.main import app

    app(args=argv, prog_name="align")


if __name__ == "__main__":
    main()
