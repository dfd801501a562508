"""The worker's tables: a faust Table whose RocksDB store is a cache of its changelog, never the truth.

faust's RocksDB store remembers, per partition, the offset of the last changelog record it holds and on
assignment resumes reading the changelog from there. When the local copy no longer belongs to the
changelog it is compared with (a new cluster, a topic deleted and recreated, a partition that retention
emptied or truncated past that offset), faust either crashes the worker at every start
(`ConsistencyError`: persisted offset past the highwater, faust-streaming issues #158 and #597) or
silently serves rows the changelog no longer has. `CheckedRocksDBStore` does what Kafka Streams does
(KAFKA-9481, KAFKA-10247): on assignment it compares each newly assigned partition's persisted offset
with the changelog partition's [earliest, end) offsets, and when the local copy is not a prefix of the
changelog (or the changelog partition is empty) it wipes that partition's local store, logs one warning
naming the table, the partition and both offsets, and lets faust restore the partition from the
changelog. A partition whose local copy is valid resumes from its persisted offset as before.

`StateTable` (the `Table` class of the worker's app) also counts the changelog records each table
restores, so a restart's cost is visible in the metrics.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from typing import Any

import faust
from faust import stores
from faust.stores.rocksdb import Store as RocksDBStore
from faust.types import TP

log = logging.getLogger(__name__)


def stale_reason(persisted: int | None, has_rows: bool, earliest: int, end: int) -> str | None:
    """Why a partition's local store cannot be resumed from its changelog partition, or None when it can.

    `persisted` is the offset of the last changelog record the local store holds (None: none recorded),
    `earliest` and `end` the changelog partition's first offset and the offset after its last record
    (equal when it is empty). The local copy is valid when it is a prefix of the changelog:
    `earliest - 1 <= persisted <= end - 1`.
    """
    if persisted is None:
        return "it holds rows but no changelog offset" if has_rows else None
    if earliest >= end:
        return f"the changelog partition is empty (offsets {earliest}..{end})"
    if persisted >= end:
        return f"its offset {persisted} is past the changelog's last offset {end - 1}"
    if persisted < earliest - 1:
        return f"its offset {persisted} is before the changelog's first offset {earliest}: records in between are gone"
    return None


class CheckedRocksDBStore(RocksDBStore):
    """faust's RocksDB store that wipes a partition's local copy when its changelog does not back it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: partitions whose local store was wiped since start-up
        self.wiped = 0

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP], generation_id: int = 0
    ) -> None:
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)
        mine = self.table.changelog_topic.topics
        standby = self.app.assignor.assigned_standbys()
        tps = [tp for tp in newly_assigned if tp.topic in mine and tp not in standby and tp.partition in self._dbs]
        if tps:
            async with self.db_lock:
                await self._drop_stale(tps)

    async def _drop_stale(self, tps: list[TP]) -> None:
        held = {tp: (self.persisted_offset(tp), self._has_rows(tp.partition)) for tp in tps}
        held = {tp: h for tp, h in held.items() if h != (None, False)}  # nothing local: nothing to check
        if not held:
            return
        consumer = self.app.consumer
        earliest = await consumer.earliest_offsets(*held)
        end = await consumer.highwaters(*held)
        for tp, (persisted, has_rows) in held.items():
            low, high = earliest.get(tp), end.get(tp)
            if low is None or high is None:
                log.warning("no offsets for %s[%d]: its local store is kept", tp.topic, tp.partition)
                continue
            reason = stale_reason(persisted, has_rows, low, high)
            if reason is None:
                continue
            log.warning(
                "table %s partition %d: local store dropped and restored from the changelog, %s "
                "(local offset %s, changelog offsets %d..%d)",
                self.table.name,
                tp.partition,
                reason,
                persisted,
                low,
                high,
            )
            self._wipe(tp.partition)

    def _has_rows(self, partition: int) -> bool:
        db = self._dbs[partition]
        return any(key != self.offset_key for key in db.keys())  # noqa: SIM118 (an Rdict iterates no keys)

    def _wipe(self, partition: int) -> None:
        db = self._dbs.pop(partition)
        db.close()
        shutil.rmtree(self.partition_path(partition), ignore_errors=True)
        self._key_index.clear()
        self._db_for_partition(partition)  # a new, empty store
        self.wiped += 1


class StateTable(faust.Table):
    """The worker's table: `rocksdb://` means `CheckedRocksDBStore`; changelog records restored are counted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: changelog records applied to the local store by recovery since start-up
        self.restored = 0

    def _new_store_by_url(self, url: Any) -> Any:
        cls = stores.by_url(url)
        if cls is not RocksDBStore:
            return super()._new_store_by_url(url)
        return CheckedRocksDBStore(
            url,
            self.app,
            self,
            table_name=self.name,
            key_type=self.key_type,
            key_serializer=self.key_serializer,
            value_serializer=self.value_serializer,
            value_type=self.value_type,
            loop=self.loop,
            options=self.options,
        )

    def apply_changelog_batch(self, batch: Iterable[Any]) -> None:
        events = batch if isinstance(batch, list) else list(batch)
        self.restored += len(events)
        super().apply_changelog_batch(events)

    @property
    def wiped(self) -> int:
        """Partitions of this table whose local store was dropped (0 for the memory store)."""
        return getattr(self.data, "wiped", 0)
