"""CPU streams: batches computed side by side, each on its share of torch's threads.

Small convolutions do more work per thread on one thread than on several, and a stream that
decodes its own batch before running the model on it overlaps the decoding (PIL releases the
GIL) with the other stream's forward pass. The extract stage (:mod:`vitad.featurebank`) and
``vitad predict`` (:mod:`vitad.serving.detector`) run their batches through :func:`map_in_streams`
so that both get the same throughput from the same extractor (its ``cpu_streams``).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def map_in_streams(function: Callable[[Item], Result], items: Sequence[Item], streams: int) -> Iterator[Result]:
    """``function(item)`` for each of ``items``, in order, computed by ``streams`` threads that
    split torch's threads between them (at most one stream per torch thread and per item; 1: all
    in the calling thread, on all torch threads). The last ``len(items) % streams`` items run
    after the others in the calling thread on all torch threads, rather than in a stream on its
    share while the other streams' cores stand idle.

    At most one item waits queued beyond those being computed. An exception in ``function``
    reaches the caller at that item's turn; the queued items are then dropped and the running ones
    finished. The calling thread's torch thread count is restored however the iteration ends.
    """
    import torch

    threads = torch.get_num_threads()
    streams = max(1, min(streams, threads, len(items)))
    if streams == 1:
        yield from map(function, items)
        return
    # torch.set_num_threads sets the calling thread's OpenMP team size and a process-wide count,
    # which a thread adopts at its first torch call (lazily, once). A stream makes that first call
    # before setting its share, or the share set last by any stream would override its own.
    shares = iter([threads // streams + 1] * (threads % streams) + [threads // streams] * (streams - threads % streams))

    def take_share() -> None:
        torch.get_num_threads()
        torch.set_num_threads(next(shares))

    pool = ThreadPoolExecutor(streams, initializer=take_share)
    pending: deque[Future] = deque()
    streamed = len(items) - len(items) % streams
    try:
        for item in items[:streamed]:
            pending.append(pool.submit(function, item))
            if len(pending) > streams:  # one item queued for whichever stream finishes first
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
    yield from map(function, items[streamed:])
