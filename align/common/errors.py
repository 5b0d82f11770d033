"""The one exception type for errors a user can cause (bad config, missing file, unknown model, ...).

The CLI prints its message on one line and exits with code 2; the message must say what to do instead.
"""


def shorten(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters (an error line must stay one line, whatever the input was)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


class AlignError(Exception):
    """A user-facing error: its message is shown as is, without a traceback."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: MemoryError, torch's OutOfMemoryError (CUDA, MPS) or the error of
    torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory"), which is a plain RuntimeError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in ("can't allocate memory", "not enough memory",
                                                                     "out of memory"))


def out_of_memory_error(doing: str, exc: BaseException, hint: str) -> AlignError:
    """One line for an allocation failure while ``doing`` something: what failed (its first 100 characters) and
    what to do."""
    what = " ".join(str(exc).split())[:100] or type(exc).__name__
    return AlignError(f"out of memory while {doing} ({what}): {hint}")
