"""Calibration over several processes: torchrun's ranks, one model replica each, results on rank 0.

``torchrun --nproc-per-node N -m converter.cli imatrix ...`` (or ``sensitivity``) starts N
processes; torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and the rendezvous address),
and :func:`open_ranks` joins them: on CUDA every process selects GPU ``LOCAL_RANK``
(``torch.cuda.set_device``, so ``"cuda"`` is that card) with NCCL for the bulk data and gloo for
the small control messages; on the CPU gloo carries both. Without torchrun's variables (or with
``WORLD_SIZE=1``) nothing is initialised and every collective below is the identity, so the single
process runs exactly the code a rank runs.

Failures: work runs inside :meth:`Ranks.step` (or reports its status through a gathered vector);
at the step's end the ranks exchange an ok flag, and when any rank failed every rank raises:
the failing rank its own exception, the others :class:`RankFailed` with the lowest failing rank's
one-line reason. So all processes exit 1 with one reason and rank 0 writes nothing.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from converter.errors import CalibrationError

from .diffusers_model import resolve_device

if TYPE_CHECKING:
    import torch

ENV_WORLD, ENV_RANK, ENV_LOCAL_RANK = "WORLD_SIZE", "RANK", "LOCAL_RANK"


class RankFailed(CalibrationError):
    """Another rank failed; ``rank`` and its reason (the message) are what every rank reports."""

    def __init__(self, rank: int, reason: str) -> None:
        super().__init__(f"rank {rank}: {reason}")
        self.rank = rank


def _one_line(exc: BaseException) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


@dataclass
class Ranks:
    """This process's place among the calibration processes (``world`` 1: alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    _control: Any = None  # the gloo group for flags and messages (None: the default group)

    @property
    def main(self) -> bool:
        """Rank 0: the one that reports progress and writes files."""
        return self.rank == 0

    def rounds(self, total: int) -> Iterator[int | None]:
        """Global sample indices in rounds of ``world``: round ``j`` gives rank ``r`` sample
        ``j * world + r`` (None once the samples run out), so every rank takes part in every
        round's collective and rank 0 can add the round's results in global sample order."""
        for start in range(0, total, self.world):
            i = start + self.rank
            yield i if i < total else None

    def mine(self, total: int) -> list[int]:
        """The indices of ``range(total)`` this rank works on (round-robin by global index)."""
        return list(range(self.rank, total, self.world))

    def agree(self, error: BaseException | None) -> None:
        """Every rank calls this at the same point; raises on every rank when any had ``error``."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        import torch
        import torch.distributed as dist

        flags = torch.tensor([0 if error is None else 1], dtype=torch.int32)
        gathered = [torch.zeros(1, dtype=torch.int32) for _ in range(self.world)]
        dist.all_gather(gathered, flags, group=self._control)
        failed = [r for r, f in enumerate(gathered) if int(f.item())]
        if not failed:
            return
        reasons: list[Any] = [None] * self.world
        dist.all_gather_object(reasons, None if error is None else _one_line(error), group=self._control)
        if error is not None:
            raise error
        first = failed[0]
        raise RankFailed(first, str(reasons[first]))

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Run the body; afterwards all ranks learn whether any body failed (see :meth:`agree`)."""
        error: BaseException | None = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - carried to every rank, then raised
            error = exc
        self.agree(error)

    def same(self, value: Any, what: str) -> None:
        """Refuse (on every rank) when the ranks see different ``value`` s: the work is shared out by
        index, so every rank must see the same inputs (on several hosts: the same files)."""
        values = self.gather_objects(value)
        for r, v in enumerate(values):
            if v != values[0]:
                raise CalibrationError(f"rank {r} sees {what} {v!r} where rank 0 sees {values[0]!r}; every rank "
                                       "needs the same inputs")

    def all_gather(self, vector: torch.Tensor) -> torch.Tensor:
        """[world, len] of every rank's ``vector`` (same length and dtype on every rank), rank order."""
        if self.world == 1:
            return vector.unsqueeze(0)
        import torch
        import torch.distributed as dist

        out = torch.empty((self.world, vector.numel()), dtype=vector.dtype, device=vector.device)
        dist.all_gather(list(out.unbind(0)), vector.contiguous())
        return out

    def broadcast(self, vector: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``vector`` on every rank (in place)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast(vector, 0)
        return vector

    def from_main(self, obj: Any) -> Any:
        """Rank 0's picklable ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, 0, group=self._control)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order, on every rank (small results)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self._control)
        return out


_LEAVE_TIMEOUT_S = 120  # how long a rank waits at exit for the others to reach it


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise CalibrationError(f"{name} is {value!r}; expected an integer (torchrun sets it)") from None


def ranks_from_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables; (0, 1, 0) without them."""
    world = _env_int(ENV_WORLD, 1)
    rank, local = _env_int(ENV_RANK, 0), _env_int(ENV_LOCAL_RANK, 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise CalibrationError(f"RANK={rank}, LOCAL_RANK={local}, WORLD_SIZE={world}: expected "
                               "0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0 (torchrun sets them)")
    return rank, world, local


@contextlib.contextmanager
def open_ranks(device: str | None) -> Iterator[Ranks]:
    """Join torchrun's process group (when there is one) and pick this rank's device.

    ``device`` None picks CUDA when a GPU is visible; on CUDA each rank selects GPU LOCAL_RANK
    (``device`` stays ``"cuda"``, which then means that card)."""
    rank, world, local = ranks_from_environment()
    dev = resolve_device(device)
    if world == 1:
        yield Ranks(device=dev)
        return
    import datetime

    import torch
    import torch.distributed as dist

    if dev == "cuda":
        if local >= torch.cuda.device_count():
            raise CalibrationError(f"LOCAL_RANK {local} but torch sees {torch.cuda.device_count()} CUDA GPU(s); "
                                   "start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)
    # one hour: a rank loading a 24 GB checkpoint from a slow disk must not time out the others
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if dev == "cuda" else "gloo",
                            timeout=datetime.timedelta(hours=1))
    try:
        control = dist.new_group(backend="gloo") if dev == "cuda" else None
        yield Ranks(rank=rank, world=world, local_rank=local, device=dev, _control=control)
    finally:
        # Every rank leaves together: a rank that tears its group down while a peer is still in
        # its last exchange (rank 0 done first, on a loaded machine) makes gloo abort the peer
        # (SIGABRT) instead of letting it exit with its own error. A peer that is gone already
        # (killed) fails the barrier within the timeout, and teardown goes on.
        try:
            dist.monitored_barrier(group=control, timeout=datetime.timedelta(seconds=_LEAVE_TIMEOUT_S),
                                   wait_all_ranks=True)
        except RuntimeError:
            pass
        dist.destroy_process_group()


__all__ = ["RankFailed", "Ranks", "open_ranks", "ranks_from_environment"]
