"""Who this process is under torch.distributed: rank, world size, its device, and the few collectives the rest of
align needs. Launched by ``torchrun`` (or ``srun torchrun`` under SLURM) the environment names the rank and the
rendezvous; without it everything here is the single-process identity and no process group is ever created, so
behaviour is exactly that of a plain run.

The backend is nccl when the ranks run on CUDA and gloo otherwise; each rank takes its local device
(``cuda:LOCAL_RANK``). No file I/O here: what ranks write, and where, is decided by the callers.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, ContextManager, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from align.common.device import pick_device
from align.common.errors import AlignError, shorten


@dataclass(frozen=True)
class Rank:
    """This process's place in the job: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes what is written once (finalized caches, results.csv, reports)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Rank()
T = TypeVar("T")


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets the torch.distributed
    environment) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def current() -> Rank:
    """This process's Rank: from the initialized process group, else SINGLE."""
    if dist.is_available() and dist.is_initialized():
        return Rank(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0))
    return SINGLE


def rank_device(requested: torch.device) -> torch.device:
    """The device this rank works on: its local GPU when ``requested`` is CUDA (without an index), else
    ``requested``."""
    if requested.type == "cuda" and requested.index is None and current().distributed:
        return torch.device("cuda", current().local_rank)
    return requested


# -- work split between ranks: rank 0 decides and writes what is written once, errors reach every rank -------------

def local_world_size() -> int:
    """How many ranks share this node (torchrun's LOCAL_WORLD_SIZE; 1 in a single process): they share its cores."""
    if not current().distributed:
        return 1
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def _failure(exc: BaseException) -> str:
    """The line the other ranks raise for a rank's failure: an AlignError's own line, else its type and text."""
    if isinstance(exc, AlignError):
        return str(exc)
    return f"rank {current().rank} failed: {type(exc).__name__}: {exc}"[:300]


def from_main(fn: Callable[[], T], job: Rank | None = None) -> T:
    """``fn()`` run on rank 0 alone, its result on every rank (``fn()`` itself in a single process). When it
    raises on rank 0, every other rank raises an AlignError with its line, so none waits for a rank that stopped;
    rank 0 re-raises the original. ``job``: the job whose ranks share the result (default: the process group;
    SINGLE: this process alone, as when one rank of a study trains a pack by itself)."""
    me = current() if job is None else job
    if not me.distributed:
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    error: BaseException | None = None
    if me.is_main:
        try:
            outcome = (True, fn())
        except Exception as exc:  # noqa: BLE001 -- reported to every rank, then re-raised here
            outcome, error = (False, _failure(exc)), exc
    ok, value = broadcast_object(outcome)
    if error is not None:
        raise error
    if not ok:
        raise AlignError(value)
    return value


@contextmanager
def main_first() -> Iterator[None]:
    """The block on rank 0 first, then on the other ranks (a hub download or dataset preparation done once, then
    read by the rest from the shared cache); rank 0's failure is raised on every rank."""
    me = current()
    if not me.distributed:
        yield
        return
    if me.is_main:
        try:
            yield
        except Exception as exc:
            broadcast_object(_failure(exc))
            raise
        broadcast_object(None)
        return
    failure = broadcast_object(None)
    if failure is not None:
        raise AlignError(failure)
    yield


@contextmanager
def main_holds(enter: Callable[[], ContextManager[Any]]) -> Iterator[None]:
    """``enter()``'s context (a lock) held by rank 0 alone for the block, for every rank: one writer per target
    whatever the number of ranks. A refusal (AlignError) is raised on every rank."""
    with ExitStack() as stack:
        from_main(lambda: (stack.enter_context(enter()), None)[1])
        yield


@contextmanager
def together(job: Rank | None = None) -> Iterator[None]:
    """Every rank runs the block, then waits for all the others (a barrier that carries failures): when it raised
    on any rank, every rank raises, the failed ones their own error and the others an AlignError with the first
    failure's line. In a single process: the block itself. ``job``: as for ``from_main``."""
    if not (current() if job is None else job).distributed:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 -- reported to every rank, then re-raised here
        error = exc
    failures = [f for f in gather_objects(None if error is None else _failure(error)) if f is not None]
    if error is not None:
        raise error
    if failures:
        raise AlignError(failures[0])


def deal(loads: list[float], ranks: int) -> list[list[int]]:
    """Indices of ``loads`` dealt to ``ranks`` ranks, each item to the least loaded rank so far (lowest rank on a
    tie), the largest first: a fixed, balanced split that every rank computes alike."""
    order = sorted(range(len(loads)), key=lambda i: (-loads[i], i))
    totals, hands = [0.0] * ranks, [[] for _ in range(ranks)]
    for i in order:
        r = min(range(ranks), key=lambda k: (totals[k], k))
        totals[r] += loads[i]
        hands[r].append(i)
    return [sorted(h) for h in hands]


# How long a rank may wait at a collective for the others: a rank that finished its share of shards or packs waits
# there for the slowest one, which can take hours. A rank that dies is noticed by torchrun, not by this timeout.
SHARE_WAIT_S = 7 * 24 * 3600.0


@contextmanager
def joined(device: str, timeout_s: float = SHARE_WAIT_S, resume: str = "run the same command again") -> Iterator[Rank]:
    """The one lifecycle of a command's ranks under ``torchrun``: the process group joined for the block (nccl on
    CUDA, gloo otherwise; collectives wait up to ``timeout_s``) and left after it → this process's Rank. Without
    torchrun: the single-process Rank, nothing joined. After a failure the group is not waited for: the process
    exits and torchrun stops the others. ``align embed``, ``align train`` and ``align compare`` all run inside it;
    the library under it never joins or leaves a group itself.

    When the job breaks under a rank (another rank died, so a collective fails; or torchrun, having seen a rank
    fail, stops this one with SIGTERM), this rank stops with one AlignError line: which rank, what happened, and
    ``resume`` (how the command continues its work)."""
    if not launched():
        yield SINGLE
        return
    with _one_line_when_the_job_breaks(resume):
        me = init(pick_device(device), timeout_s=timeout_s)
        yield me
        shutdown()


class Stopped(BaseException):
    """SIGTERM reached a rank: torchrun sends it to every rank once one has failed (SLURM too, when the job is
    cancelled). A BaseException, like KeyboardInterrupt, so that no ``except Exception`` of the library takes it for
    a failure of its own to report to the other ranks."""


def _stop(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the rank is on its way out
    raise Stopped()


@contextmanager
def _one_line_when_the_job_breaks(resume: str) -> Iterator[None]:
    """The block, with a broken job (``_broken_job``) raised as one AlignError line ending in ``resume``. From the
    first failure on, SIGTERM is ignored: this rank then exits by itself with its line said, instead of being cut
    off by torchrun's SIGTERM while it says it."""
    main_thread = threading.current_thread() is threading.main_thread()  # signals are the main thread's
    previous = signal.signal(signal.SIGTERM, _stop) if main_thread else None
    try:
        try:
            yield
        except BaseException:
            if main_thread:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise
    except (Stopped, Exception) as exc:  # a SIGTERM in the handler above lands here too
        what = _broken_job(exc)
        if what is None:
            raise
        me = current()
        who = f"rank {me.rank} of {me.world_size}" if me.distributed else f"rank {os.environ.get('RANK', '?')}"
        raise AlignError(shorten(f"{who} {what}: {resume}")) from None
    if main_thread:
        signal.signal(signal.SIGTERM, previous)


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")


def _broken_job(exc: BaseException) -> str | None:
    """What broke the job under this rank, in words, or None when ``exc`` is not such a failure (an AlignError, a
    bug: those keep their own line or traceback)."""
    if isinstance(exc, Stopped):
        return ("was stopped by SIGTERM (torchrun stops every rank once one has failed: its summary says which; or "
                "the job was cancelled)")
    distributed_error = getattr(dist, "DistError", ())
    text = " ".join(str(exc).split())
    if not (isinstance(exc, distributed_error) or isinstance(exc, RuntimeError)
            and any(s in text for s in ("gloo", "NCCL", "nccl", *PEER_GONE))):
        return None
    reason = text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text  # gloo's [file:line] prefix
    reason = reason.split(". This is typically", 1)[0][:100]
    if any(s in text for s in PEER_GONE):
        return f"lost another rank of the job ({reason}): it stopped or was killed (torchrun's summary says which)"
    return f"stopped: a collective of the job failed ({reason})"


def init(device: torch.device, timeout_s: float = 1800.0) -> Rank:
    """Join the process group torchrun describes (nccl on CUDA, gloo otherwise); a no-op without a launcher or
    when already joined. → this process's Rank."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise AlignError("launched with WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise AlignError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: launch with torchrun "
                         "(torchrun --nproc-per-node N --no-python align ...)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0") or 0))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return current()


def shutdown() -> None:
    """Leave the process group (after a last barrier) if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if current().distributed:
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank ([obj] in a single process)."""
    if not current().distributed:
        return [obj]
    out: list[Any] = [None] * current().world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank: one rank's failure reaches the others, so that no rank waits forever at
    the next collective for a rank that has stopped."""
    if not current().distributed:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(flag)  # gloo and nccl both reduce int64 (nccl needs it on the rank's device)
    return int(flag.item()) == 0


def _collective_device() -> torch.device:
    """Where a tensor made for a collective must live: the rank's GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- data-parallel training: gradients and gathered features ----------------------------------------------

def all_reduce_mean_(tensors: list[Tensor]) -> None:
    """Replace each tensor by its mean over the ranks, in place (nothing in a single process).

    One collective per dtype over the tensors laid end to end. Every rank ends with the same bits: the reduction
    is done once per element and its result sent to all ranks (gloo's and nccl's ring all-reduce both do this)."""
    rank = current()
    if not rank.distributed or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat.div_(rank.world_size)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_gather_local(x: Tensor, dim: int) -> Tensor:
    """Every rank's ``x`` laid side by side along ``dim`` (rank order), the gradient flowing only into this rank's
    own part: open_clip's ``gather_features`` with the local features substituted (``x`` in a single process)."""
    rank = current()
    if not rank.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(rank.world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank.rank] = x
    return torch.cat(parts, dim)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient of the gathered tensor over the ranks and hands each rank the
    slice of its own part (open_clip's ``gather_with_grad``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int) -> Tensor:  # type: ignore[override]
        rank = current()
        parts = [torch.empty_like(x) for _ in range(rank.world_size)]
        dist.all_gather(parts, x.contiguous())
        ctx.dim, ctx.rank, ctx.size = dim, rank.rank, x.shape[dim]
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # all-reduce rather than reduce-scatter: gloo has no reduce-scatter
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None


def all_gather_with_grad(x: Tensor, dim: int) -> Tensor:
    """Every rank's ``x`` laid side by side along ``dim``, differentiable for every rank: the gradient reaching
    this rank's ``x`` is the sum over ranks of the gradients of its part (``x`` in a single process)."""
    if not current().distributed:
        return x
    return _GatherWithGrad.apply(x, dim)
