"""Counts the user-state changelog lost, read again from the topics they were counted from.

The user-state changelog is compacted: compaction keeps every user's latest row, and the log start
offset of a partition moves only when retention (a topic reconfigured to `cleanup.policy=delete`) or
DeleteRecords removes its first records. Rows whose latest record was removed are gone, and a worker
that recovers the partition from the changelog would start those users from zero.

The source of every count is still on `plays` (and the plays other clients' partitioners put on other
partitions, on `plays.repartition`). So at the end of every recovery (each seek to the committed
offsets, `stream.ingest.add_seek_hook`), for each assigned partition p whose changelog partition
starts above offset 0, and above the offset recorded as repaired on the `repairs` topic, the worker
reads `plays[p]` and `plays.repartition[p]` again from their first offsets. Counting is idempotent by
source offset (docs/RELIABILITY.md), so a row the changelog kept skips every play it already holds and
a lost row is counted again from its first play: the partition's counts become exact again. When the
batches up to the end offsets those partitions had at detection are durable, every row the worker
holds for the partition is written to the changelog again (a worker that restored the partition before
the records were deleted holds rows the changelog no longer has, which the re-read plays leave
unchanged, so nothing else would write them), and the repair is recorded on
`repairs` (key: the partition number, value: the changelog's log start offset it repaired), so later
assignments do not read the partition again unless the changelog loses more.

Limits (logged, and in /metrics): plays the `plays` topic no longer holds itself (its own retention) are
lost for good; only the user-state table is repaired (a new track's listener rows refill as the
listeners fold in again); while a partition is read again its listeners' answers reflect the plays
re-read so far (`/ready` lists the partitions being restored).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from faust.types import TP

from stream.codec import pack_message, unpack_message

log = logging.getLogger(__name__)

Send = Callable[[int, bytes], Awaitable[Any]]
ReadAll = Callable[[], Awaitable[list[Any]]]
Rewrite = Callable[[int], Awaitable[int]]


@dataclass
class Repair:
    """One changelog partition being restored from its source topics."""

    partition: int
    log_start: int  # the changelog partition's first offset when the loss was found
    first: dict[TP, int]  # where the source partitions are read again from
    targets: dict[TP, int]  # source partition -> its end offset at detection, until reached
    started: float = field(default_factory=time.monotonic)
    recording: bool = False


def decode_repair(key: bytes | None, value: bytes | None) -> tuple[int, int] | None:
    """(partition, repaired log start offset) of a `repairs` record, or None for a malformed one."""
    try:
        body = unpack_message(value or b"")
        partition, log_start = body["partition"], body["log_start"]
        if isinstance(partition, int) and isinstance(log_start, int) and partition >= 0 and log_start >= 0:
            return partition, log_start
    except Exception:
        pass
    return None


class SourceReplay:
    """Finds user-state changelog partitions that lost records and restores them from `plays`.

    `changelog` is the user-state changelog topic, `plays` and `repartition` the topics its counts come
    from (same partition numbers); `send(partition, value)` records a finished repair on `repairs`,
    `read_repairs()` returns every record of `repairs`, and `rewrite(partition)` writes every row the
    worker holds for the partition to the changelog again (rows the re-read plays did not change, e.g.
    restored from the changelog before it lost them, would be missing from it); returns how many."""

    def __init__(
        self,
        app: Any,
        changelog: str,
        plays: str,
        repartition: str,
        send: Send,
        read_repairs: ReadAll,
        rewrite: Rewrite,
    ) -> None:
        self.app = app
        self.changelog, self.plays, self.repartition = changelog, plays, repartition
        self.send, self.read_repairs, self.rewrite = send, read_repairs, rewrite
        self.repaired: dict[int, int] = {}  # partition -> changelog log start offset already repaired
        self.active: dict[int, Repair] = {}
        self.completed = 0  # partitions restored since start-up
        self.unrecoverable = 0  # source offsets the source topics no longer hold, over all repairs
        self._writes: set[asyncio.Future] = set()

    # -- the repairs topic --------------------------------------------------------------------
    def on_repairs(self, records: list[Any]) -> None:
        for record in records:
            decoded = decode_repair(record.key, record.value)
            if decoded is None:
                log.warning("ignoring a malformed repairs record at %s/%s", record.partition, record.offset)
                continue
            partition, log_start = decoded
            self.repaired[partition] = max(self.repaired.get(partition, 0), log_start)

    # -- detection (a seek hook) ----------------------------------------------------------------
    async def rewinds(self, assignment: set[TP]) -> dict[TP, int]:
        """{source partition: offset to read again from} for the assigned partitions whose changelog
        lost records; forgets repairs of partitions no longer assigned (their next owner redoes them)."""
        mine = sorted(tp.partition for tp in assignment if tp.topic == self.plays)
        for partition in [p for p in self.active if p not in mine]:
            log.info("changelog partition %d moved before its restore finished: its next owner restores it", partition)
            del self.active[partition]
        if not mine:
            return {}
        consumer = self.app.consumer
        changelog_tps = [TP(self.changelog, p) for p in mine]
        starts = await consumer.earliest_offsets(*changelog_tps)
        lost = [p for p in mine if (starts.get(TP(self.changelog, p)) or 0) > self.repaired.get(p, 0)]
        if lost:  # another worker may have restored them since this one last read `repairs`
            try:
                self.on_repairs(await self.read_repairs())
            except Exception as exc:
                log.warning("could not read the repairs topic (%r): partitions may be restored again", exc)
        rewinds: dict[TP, int] = {}
        for partition in lost:
            log_start = starts.get(TP(self.changelog, partition)) or 0
            if log_start <= self.repaired.get(partition, 0):
                continue  # lost and already restored
            repair = self.active.get(partition)
            if repair is None or repair.log_start != log_start:
                repair = self.active[partition] = await self._start(partition, log_start)
            if not repair.targets:
                self._record(repair)
            rewinds.update({tp: repair.first[tp] for tp in repair.targets})
        return rewinds

    async def _start(self, partition: int, log_start: int) -> Repair:
        consumer = self.app.consumer
        sources = [TP(self.plays, partition), TP(self.repartition, partition)]
        first = await consumer.earliest_offsets(*sources)
        end = await consumer.highwaters(*sources)
        first = {tp: first.get(tp) or 0 for tp in sources}
        targets = {tp: end[tp] for tp in sources if end.get(tp, 0) > first[tp]}
        log.warning(
            "user-state changelog partition %d lost its records before offset %d (retention or DeleteRecords): "
            "restoring its counts by reading %s",
            partition,
            log_start,
            ", ".join(f"{tp.topic}[{partition}] {first[tp]}..{end.get(tp, 0)}" for tp in sources),
        )
        gone = sum(first.values())
        if gone:
            self.unrecoverable += gone
            log.error(
                "partition %d: %d plays before offsets %s were deleted from the source topics themselves "
                "(their retention): the counts they made cannot be restored",
                partition,
                gone,
                {tp.topic: first[tp] for tp in sources},
            )
        return Repair(partition, log_start, first, targets)

    # -- progress ------------------------------------------------------------------------------
    def track(self, batch: list[Any], completion: asyncio.Future | None) -> None:
        """Note the batch's highest offsets of partitions being restored; they count as read again once
        `completion` (the batch's fold-in and changelog write) finished."""
        if not self.active or not batch:
            return
        highest: dict[TP, int] = {}
        for record in batch:
            tp = TP(record.topic, record.partition)
            if record.partition in self.active and record.offset > highest.get(tp, -1):
                highest[tp] = record.offset
        if not highest:
            return
        if completion is None:
            self._reached(highest)
            return
        completion.add_done_callback(lambda f: None if f.cancelled() or f.exception() else self._reached(highest))

    def _reached(self, highest: dict[TP, int]) -> None:
        for tp, offset in highest.items():
            repair = self.active.get(tp.partition)
            if repair is None or tp not in repair.targets or offset < repair.targets[tp] - 1:
                continue
            del repair.targets[tp]
            if not repair.targets:
                self._record(repair)

    def _record(self, repair: Repair) -> None:
        if repair.recording:
            return
        repair.recording = True
        task = asyncio.ensure_future(self._write(repair))
        self._writes.add(task)  # a reference until it finishes (the loop keeps only weak ones)
        task.add_done_callback(self._writes.discard)

    async def _write(self, repair: Repair) -> None:
        body = {"partition": repair.partition, "log_start": repair.log_start, "at": int(time.time() * 1000)}
        try:
            rows = await self.rewrite(repair.partition)
            await self.send(repair.partition, pack_message(body))
        except Exception:
            repair.recording = False
            log.exception("could not record the restore of partition %d: it is read again next time", repair.partition)
            return
        self.repaired[repair.partition] = max(self.repaired.get(repair.partition, 0), repair.log_start)
        if self.active.get(repair.partition) is repair:
            del self.active[repair.partition]
        self.completed += 1
        log.info(
            "user-state changelog partition %d restored from its source topics in %.1f s (%d rows written again)",
            repair.partition,
            time.monotonic() - repair.started,
            rows,
        )

    def restoring(self) -> list[int]:
        """Partitions whose counts are being read again now."""
        return sorted(self.active)
