"""Peak anonymous memory of a process tree, as ../shared/tools/peakanon.py measures it: ``RssAnon`` of
/proc/PID/status summed over a process and its descendants (a memory-mapped file's pages count in RSS, but the
kernel can drop them, so RSS would not say what a run holds). Shared by the benchmarks that sample it themselves."""
from __future__ import annotations

import os


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant living now."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += [child for child, up in parent.items() if up == p]
    return tree


def anon_kib(pid: int) -> int:
    """A process's RssAnon in KiB (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
