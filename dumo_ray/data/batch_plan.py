"""How one global batch is shared out over however many workers there are.

The global batch B is fixed by the config; the number of workers W is whatever Ray Train granted (it
changes in elastic runs). Worker r takes B // W images (the first B % W workers one more), in
`accumulation` micro-batches of at most `optim.micro_batch_size`. Every micro-batch's mean loss is
weighted by (its size x W x accumulation / B): after DeepSpeed divides by the accumulation steps and
averages over workers, the gradient is exactly that of the mean loss over the B images, for any W,
even or uneven.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def workers_phrase(count: int) -> str:
    return "1 worker" if count == 1 else f"{count} workers"


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    world_size: int
    rank: int
    micro_batch_limit: int | None = None

    def __post_init__(self) -> None:
        if self.global_batch < self.world_size:
            raise ValueError(f"global batch {self.global_batch} cannot give each of {self.world_size} workers an image")

    def share(self, rank: int) -> int:
        base, extra = divmod(self.global_batch, self.world_size)
        return base + (1 if rank < extra else 0)

    @property
    def offset(self) -> int:
        """Position of this worker's share inside the global batch."""
        return sum(self.share(r) for r in range(self.rank))

    @property
    def accumulation(self) -> int:
        """Micro-batches per step: the same on every worker (DeepSpeed steps them together)."""
        largest = self.share(0)
        return 1 if self.micro_batch_limit is None else math.ceil(largest / self.micro_batch_limit)

    @property
    def micro_batches(self) -> list[int]:
        """Sizes of this worker's micro-batches (they differ by at most one)."""
        base, extra = divmod(self.share(self.rank), self.accumulation)
        return [base + (1 if i < extra else 0) for i in range(self.accumulation)]

    def weight(self, size: int) -> float:
        return size * self.world_size * self.accumulation / self.global_batch

    @property
    def nominal_micro_batch(self) -> int:
        """The micro-batch size DeepSpeed's config is given (its bookkeeping wants one number)."""
        return math.ceil(self.share(0) / self.accumulation)

    def describe(self) -> str:
        shares = sorted({self.share(r) for r in range(self.world_size)}, reverse=True)
        per_worker = "/".join(str(s) for s in shares)
        text = f"global batch {self.global_batch} = {workers_phrase(self.world_size)} x {per_worker}"
        if self.accumulation > 1:
            text += f" ({self.accumulation} accumulated micro-batches of <= {self.nominal_micro_batch})"
        return text
