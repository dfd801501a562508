"""Batched fast path for consuming a Kafka topic inside a faust worker.

faust delivers every record through ``Consumer._drain_messages``, which awaits
``Service.wait_first(callback(message), suspend_flow.wait())`` **per record** (four asyncio tasks
plus ``asyncio.wait`` each time, ~45 µs here), then the conductor, ``Event`` creation, a queue
hop, ``Stream`` iteration and a per-event ack.  That per-record machinery caps a worker at
~11 K events/s even with no work, and ``wait_first`` alone at ~21 K/s.  No Channel/Topic subclass
can avoid it because it sits in the consumer loop itself, so this module swaps in a consumer
subclass (the minimum patch) whose drain loop hands records of *ingest topics* to a batch handler
and sends every other record (table changelogs during recovery, ordinary agents) down faust's
unchanged per-record path.

Everything else stays faust: group membership, faust's ``PartitionAssignor`` (tables co-located
with the source partitions), changelog-backed tables and their recovery, offset commits
(``Consumer.commit`` driven by the acks we record), the web server and ``app.table_route``.

Usage (before the worker starts, i.e. at app-module import time)::

    app = faust.App("playrec", broker=..., topic_partitions=8)
    counts = app.Table("counts", default=dict)

    async def handle(batch: list[ConsumerRecord]) -> None:  # aiokafka records
        for msg in batch:
            with source_partition(app, msg):                # table writes -> msg.partition
                counts[msg.key.decode()] = ...

    BatchIngest(app, "plays", handle, max_batch=10_000, max_latency_s=0.05)

Semantics (see docs/STREAM-INGEST.md):

* A batch's offsets are acked only after ``handler(batch)`` returns, so faust commits only
  processed records (at-least-once).  A handler may instead return an awaitable (its *completion*,
  e.g. a task that finishes the batch's work and makes it durable): the batch is then acked when
  the completion finishes, and the next batch is handed to the handler meanwhile.  Acks stay in
  batch order (each completion waits for the previous one; a failed completion crashes the app and
  no later batch is acked), and a rebalance or stop awaits the pending completion before it commits.
  Changelog records of the batch are flushed by faust's commit (``producer.flush()`` precedes the
  offset commit).  A crash after the handler but before
  the commit replays the batch; handlers that must be idempotent keep a per-key source offset.
* A handler exception crashes the app (records stay unacked and are re-delivered).
* Backpressure: the handler runs inline in the drain loop, so fetching/decoding stops while a
  batch is processed; memory is one batch plus aiokafka's prefetch.  With ``ready`` (a callable
  that says whether the handler can take a batch without waiting, e.g. its previous completion
  finished), a due batch keeps growing up to ``max_batch`` while the handler is busy, so records
  are fetched and converted in parallel with the previous batch's completion.  After each batch the loop
  waits for the producer buffer to ebb (changelog writes).
* Rebalance/stop: buffered-but-unprocessed records are dropped (never acked, so re-delivered to
  the next owner), the batch in flight (shielded from cancellation) is awaited, and its offsets
  are committed before faust forgets the revoked partitions.  Records of an old consumer
  generation are never handed to the handler nor acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, cast

from faust.streams import _current_event
from faust.transport.consumer import CONSUMER_FETCHING
from faust.types import TP, AppT, Message
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

__all__ = ["BatchHandler", "BatchIngest", "BatchingConsumerMixin", "SeekHook", "add_seek_hook", "source_partition"]

log = logging.getLogger("playrec.stream.ingest")

#: ``async def handler(batch)``; ``batch`` holds aiokafka ``ConsumerRecord`` objects (``.key`` and
#: ``.value`` raw bytes, ``.topic``, ``.partition``, ``.offset``, ``.timestamp`` in milliseconds,
#: ``.headers``), in offset order per partition, all of one consumer generation.  It returns None
#: (ack now) or an awaitable completion (ack when done).
BatchHandler = Callable[[list[Any]], Awaitable[Awaitable[Any] | None]]

_SINKS_ATTR = "_playrec_batch_ingest"
_SEEK_HOOKS_ATTR = "_playrec_seek_hooks"

#: ``async def hook(assignment) -> {tp: offset}``: run after every seek of the assigned partitions to
#: their committed offsets (the end of each recovery); the partitions it returns are read again from
#: ``offset`` (their commits never move back: acks below the committed offset are ignored).
SeekHook = Callable[[set[TP]], Awaitable[dict[TP, int]]]

#: seconds between checks of a busy handler's ``ready()`` while a due batch waits for it
READY_POLL_S = 0.005
#: longest a stop waits for the batch completions in flight (fold-ins and their changelog writes)
STOP_COMPLETION_S = 20.0
#: longest the broker may hold a fetch of this consumer (faust's default 1500 ms delays busy partitions)
FETCH_MAX_WAIT_MS = 50


def _sinks(app: AppT) -> dict[str, BatchIngest]:
    sinks = getattr(app, _SINKS_ATTR, None)
    if sinks is None:
        sinks = {}
        setattr(app, _SINKS_ATTR, sinks)
    return cast(dict[str, "BatchIngest"], sinks)


def add_seek_hook(app: AppT, hook: SeekHook) -> None:
    """Run ``hook`` after every seek to the committed offsets (see :data:`SeekHook`)."""
    hooks = getattr(app, _SEEK_HOOKS_ATTR, None)
    if hooks is None:
        hooks = []
        setattr(app, _SEEK_HOOKS_ATTR, hooks)
    hooks.append(hook)


@contextlib.contextmanager
def source_partition(app: AppT, message: Message) -> Iterator[None]:
    """Make table writes inside the block go to ``message.partition`` of the changelog.

    faust's ``Table.partition_for_key`` reads the partition from the *current event* (a context
    variable normally set by ``Stream``); this sets it to an event for ``message``.  faust also
    checks once per source topic that it has as many partitions as the changelog.
    """
    event = app.create_event(message.key, message.value, message.headers, message)
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class BatchIngest:
    """Deliver the records of ``topic_name`` to ``handler`` in batches, acking after it returns.

    Create it at import time of the app module (before ``app.consumer`` exists): it subscribes
    the topic through faust's conductor (so the assignor sees it) and installs the batching
    consumer class on ``app.transport``.
    """

    def __init__(
        self,
        app: AppT,
        topic_name: str,
        handler: BatchHandler,
        *,
        max_batch: int = 10_000,
        max_latency_s: float = 0.05,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        if max_batch < 1 or max_latency_s < 0:
            raise ValueError("max_batch must be >= 1 and max_latency_s >= 0")
        self.app = app
        self.topic_name = topic_name
        self.handler = handler
        self.max_batch = max_batch
        self.max_latency_s = max_latency_s
        self.ready = ready
        self.buffer: list[Any] = []  # aiokafka ConsumerRecord objects
        self.generation: int | None = None  # consumer generation the buffered records were fetched in
        self.first_at = 0.0  # monotonic time the oldest buffered record arrived
        self.batches = 0
        self.events = 0
        sinks = _sinks(app)
        if topic_name in sinks:
            raise ValueError(f"topic {topic_name!r} already has a BatchIngest")
        _install_consumer_class(app)
        # A plain raw topic with acks on: the conductor subscribes it (and the assignor groups it
        # with same-sized topics, i.e. the table changelogs); ``acks_enabled_for`` becomes true.
        self.topic = app.topic(topic_name, key_serializer="raw", value_serializer="raw", acks=True)
        app.topics.add(self.topic)
        sinks[topic_name] = self

    def due(self, now: float) -> bool:
        """Flush now: the buffer is full, or its oldest record waited ``max_latency_s`` and the
        handler is ready (a busy handler lets the batch grow: records are fetched and converted while
        it works, and the next batch holds everything that arrived meanwhile)."""
        if len(self.buffer) >= self.max_batch:
            return True
        if not self.buffer or now - self.first_at < self.max_latency_s:
            return False
        return self.ready is None or self.ready()

    def remaining_s(self, now: float) -> float:
        """Longest wait for new records before :meth:`due` must be checked again."""
        if not self.buffer:
            return 1.0
        left = self.first_at + self.max_latency_s - now
        return left if left > 0 else READY_POLL_S


def _install_consumer_class(app: AppT) -> None:
    existing = getattr(app, "_consumer", None)
    if existing is not None and not isinstance(existing, BatchingConsumerMixin):
        raise RuntimeError("BatchIngest must be created before app.consumer is first used")
    transport = app.transport
    base = transport.Consumer
    if isinstance(base, type) and issubclass(base, BatchingConsumerMixin):
        return
    transport.Consumer = type(f"Batching{base.__name__}", (BatchingConsumerMixin, base), {})  # type: ignore[misc]
    log.debug("installed batching consumer over %s.%s", base.__module__, base.__qualname__)


class BatchingConsumerMixin:
    """Mixed in front of the transport's ``Consumer``; replaces ``_drain_messages``.

    The loop below is faust 0.15.3's ``Consumer._drain_messages`` + ``Consumer.getmany``
    (transport/consumer.py) over whole fetch results: records of ingest topics are appended to their
    sink's buffer a partition's run at a time, as the aiokafka records they are (faust's per-record
    ``ConsumerMessage``, generator step, high-water lookup and ``wait_first`` cost ~10 us a record);
    other topics keep faust's per-record path.
    """

    _ingest_inflight: asyncio.Task[None] | None = None
    _ingest_pending: asyncio.Task[bool] | None = None  # the last batch's completion (acks when done)
    _ingest_suspended: bool = False
    _ingest_epoch: int = 0  # bumped when a seek starts and when it ends (a fetch that overlapped one is stale)
    _ingest_seeking: int = 0  # seeks in progress
    _ingest_commit: asyncio.Future | None = None  # the commit started after `commit_every` acks, if running

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: per assigned partition of an ingest topic: the offset of the next record to hand on (None: the last
        #: seek found nothing committed and nothing was handed on since; absent: not sought since assignment)
        self._ingest_next: dict[TP, int | None] = {}
        #: partitions whose fetched records were dropped: sought back to their next offset before the next fetch
        self._ingest_reseek: set[TP] = set()
        #: changelog (non-ingest) partition -> first offset of records fetched but not delivered: sought back
        #: there before the next fetch unless the position is already at or below it (`_redo_changelogs`)
        self._changelog_redo: dict[TP, int] = {}
        super().__init__(*args, **kwargs)

    async def perform_seek(self) -> None:
        """faust's seek of every assigned partition to its committed offset, then the seek hooks' rewinds.

        The buffered records of the assigned ingest partitions are dropped (fetched again from the new
        positions) and each partition's next offset is set to where it was sought. A fetch that overlapped
        the seek is stale (`_ingest_epoch`): its runs are handed on only where they continue the partition's
        next offset (see `_ingest_records`). With hooks, the ingest partitions are also paused from before
        the hooks run until every seek is done."""
        me = cast(Any, self)
        hooks = getattr(me.app, _SEEK_HOOKS_ATTR, ())
        assignment = set(me.assignment())
        generation = me.app.consumer_generation_id
        sinks = _sinks(me.app)
        mine = {tp for tp in assignment if tp.topic in sinks}
        held = {tp for tp in mine if tp in me._get_active_partitions()} if hooks else set()
        self._ingest_seeking += 1
        self._ingest_epoch += 1
        if held:
            me.pause_partitions(held)
        self._drop_buffered(mine)
        try:
            rewinds: dict[TP, int] = {}
            for hook in hooks:
                rewinds.update((await hook(assignment)).items())
            await super().perform_seek()  # type: ignore[misc]
            offsets = self._ingest_next
            for tp in mine:  # faust set the read offsets to the committed ones (None: none committed)
                offsets[tp] = me._read_offset.get(tp)
            self._drop_buffered(mine)  # (handed on during the seek: fetched again from the committed offsets)
            for tp, offset in rewinds.items():
                if tp in assignment:
                    log.info("reading %s[%d] again from offset %d", tp.topic, tp.partition, offset)
                    await me.seek(tp, offset)
                    offsets[tp] = offset
                    self._drop_buffered({tp})
        finally:
            self._ingest_seeking -= 1
            self._ingest_epoch += 1
            # only in the same generation: a rebalance that started meanwhile paused them for itself (and
            # may move them); resuming them here let records flow for partitions on their way out
            if held and me.app.consumer_generation_id == generation and not self._ingest_suspended:
                me.resume_partitions(held & set(me.assignment()))

    def _drop_buffered(self, tps: set[TP]) -> None:
        for sink in _sinks(cast(Any, self).app).values():
            if sink.buffer:
                sink.buffer = [r for r in sink.buffer if TP(r.topic, r.partition) not in tps]

    async def _reseek(self) -> None:
        """Seek the partitions whose fetched records were dropped back to their next offset (None there: the
        seek found nothing committed, so their first offset; counting skips what was applied), so the
        dropped records are fetched again; records already buffered stay (they precede it). A partition
        not sought since its assignment is left to that seek (every assignment ends with one). Runs in the
        drain loop between fetches, never while a seek is in progress."""
        me = cast(Any, self)
        pending = self._ingest_reseek
        epoch, offsets = self._ingest_epoch, self._ingest_next
        tps = sorted(pending & set(me.assignment()) & offsets.keys())
        pending.clear()
        unknown = [tp for tp in tps if offsets[tp] is None]
        earliest = await me.earliest_offsets(*unknown) if unknown else {}
        if self._ingest_epoch != epoch or self._ingest_seeking:
            pending.update(tps)  # a seek started meanwhile: it sets the positions; checked again after it
            return
        for tp in tps:
            offset = offsets[tp]
            if offset is None:
                offset = offsets[tp] = earliest.get(tp) or 0
            log.info("fetching %s[%d] again from offset %d (a stale fetch)", tp.topic, tp.partition, offset)
            await me.seek(tp, offset)

    # ---------------------------------------------------------------- drain loop
    async def _drain_messages(self, fetcher: Any) -> None:
        me = cast(Any, self)
        sinks = _sinks(me.app)
        if not sinks:
            await super()._drain_messages(fetcher)  # type: ignore[misc]
            return
        consumer_should_stop = me._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        set_flag, unset_flag = me.diag.set_flag, me.diag.unset_flag
        monotonic = time.monotonic
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                now = monotonic()
                timeout = min([1.0, *(s.remaining_s(now) for s in sinks.values())])
                if self._ingest_reseek and not self._ingest_seeking and me.flow_active:
                    await self._reseek()
                if self._changelog_redo:
                    await self._redo_changelogs()
                fetched = (me.app.consumer_generation_id, self._ingest_epoch if not self._ingest_seeking else -1)
                records, active = await me._wait_next_records(timeout)
                if records and not me.should_stop:
                    if me.flow_active:
                        await self._ingest_records(records, active, sinks, fetched)
                    else:  # what faust's getmany does when the flow stopped
                        self._undelivered("flow stopped", records, sinks)
                        try:
                            await me.perform_seek()
                        except Exception as exc:
                            log.warning("exception performing seek when flow not active %r", exc)
                unset_flag(CONSUMER_FETCHING)
                now = monotonic()
                for sink in sinks.values():
                    if sink.due(now):
                        await self._ingest_flush(sink)
        except me.consumer_stopped_errors:
            if me.transport.app.should_stop:
                log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if me.transport.app.should_stop:
                log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    async def _ingest_records(
        self, records: Any, active: set[TP] | None, sinks: dict[str, BatchIngest], fetched: tuple[int, int]
    ) -> None:
        """One fetch result (``{tp: [aiokafka ConsumerRecord, ...]}``): records of ingest topics are appended
        to their sink's buffer a partition's run at a time (no per-record message object or generator
        step); any other topic's records take faust's per-record path. Partitions faust does not consider
        active (paused for recovery) are skipped, as in faust's ``Consumer.getmany``.

        `fetched` is (consumer generation, seek epoch) when the fetch started (epoch -1: during a seek).
        An ingest partition's records are handed on only in offset order from the partition's next offset
        (`_ingest_next`): a run that starts below it is trimmed (fetched twice), and one that starts
        above it is a hole, taken (a faust "gap": compaction, transaction markers) only from a fetch that
        started after the last seek ended. A fetch that overlapped a seek may have been read from the
        position before it: handing on its records after the seek moved the partition back made the
        records in between look delivered (skipped when fetched again) and the gap let the commit pass
        them (plays lost at a rebalance, issue #13). Every run not handed on (a rebalance, a hole in a stale
        fetch) is fetched again from the partition's next offset (`_reseek`)."""
        me = cast(Any, self)
        fetch_generation, epoch = fetched
        generation = me.app.consumer_generation_id
        buffered = me._buffered_partitions
        offsets = self._ingest_next
        reseek = self._ingest_reseek
        set_read_offset = me._read_offset.__setitem__
        for tp, recs in records.items():
            if me.app.consumer_generation_id != generation or not me.flow_active:
                # faust's check: the rest is fetched again from the new assignment's positions (its seek)
                reseek.update(t for t in records if t.topic in sinks)
                self._undelivered("rebalance during the fetch", records, sinks, after=tp)
                return
            if not recs or (active is not None and tp not in active and tp not in buffered):
                if recs and tp.topic in sinks:
                    reseek.add(tp)
                elif recs:
                    self._undelivered("partition not active", {tp: recs}, sinks)
                continue
            me.app.monitor.track_tp_end_offset(tp, me.highwater(tp))
            sink = sinks.get(tp.topic)
            if sink is None:  # (changelogs: their recovery positions them; never dropped for a stale fetch)
                await self._faust_records(tp, recs, generation)
                continue
            if self._ingest_suspended or fetch_generation != generation:
                reseek.add(tp)  # rebalance/stop in progress, or fetched before the last one: fetched again
                continue
            now_epoch = self._ingest_epoch
            stale = self._ingest_seeking > 0 or now_epoch != epoch
            nxt = offsets.get(tp)
            first = 0
            if nxt is not None:
                while first < len(recs) and recs[first].offset < nxt:
                    first += 1  # already handed on
                if first == len(recs):
                    continue
                if stale and recs[first].offset > nxt:
                    reseek.add(tp)  # read from a position before a seek moved the partition back
                    continue
            elif stale:
                reseek.add(tp)  # (sought to the first offset if the seek found nothing committed)
                continue
            if me.app.topics.acks_enabled_for(tp.topic):
                await self._register_gaps(tp, recs, first, nxt)
                if self._ingest_epoch != now_epoch or me.app.consumer_generation_id != generation:
                    reseek.add(tp)  # a seek or a rebalance started meanwhile
                    continue
            if sink.buffer and sink.generation != generation:
                sink.buffer = []  # an older generation's records: never handled nor acked (re-delivered)
            sink.generation = generation
            while first < len(recs):
                buffer = sink.buffer
                if not buffer:
                    sink.first_at = time.monotonic()
                take = min(len(recs) - first, sink.max_batch - len(buffer))
                buffer.extend(recs[first : first + take])
                first += take
                last = buffer[-1].offset
                set_read_offset(tp, last)
                offsets[tp] = last + 1
                if len(buffer) >= sink.max_batch:
                    await self._ingest_flush(sink)
                    if (
                        me.app.consumer_generation_id != generation
                        or self._ingest_suspended
                        or self._ingest_epoch != now_epoch
                    ):
                        if first < len(recs):
                            reseek.add(tp)
                        break
            await asyncio.sleep(0)  # let requests and completions run between partitions

    def _undelivered(self, reason: str, records: Any, sinks: dict[str, BatchIngest], after: TP | None = None) -> None:
        """Changelog (non-ingest) records of a fetch result dropped before delivery: their partition's
        position is already past them, and a recovery that sought the partition before this fetch returned
        (the fetch was in flight in the consumer thread while a rebalance stopped the flow) waits for them
        forever, or completes without them; so they are fetched again (`_redo_changelogs`)."""
        items = list(records.items())
        if after is not None:
            items = items[[tp for tp, _ in items].index(after) :]
        for tp, recs in items:
            if recs and tp.topic not in sinks:
                self._redo_changelog(reason, tp, recs[0].offset, recs[-1].offset)

    def _redo_changelog(self, reason: str, tp: TP, first: int, last: int) -> None:
        log.info("%s: records %d-%d of %s[%d] not delivered", reason, first, last, tp.topic, tp.partition)
        redo = self._changelog_redo
        redo[tp] = min(first, redo.get(tp, first))

    async def _redo_changelogs(self) -> None:
        """Seek each changelog partition with undelivered records back to the first of them, only where its
        fetch position is past it (a seek since, e.g. the next recovery's, moved it at or below: left
        alone). Moving a changelog partition back never loses a row: records are re-read in order and the
        last one of each key wins, as in any recovery. Check and seek run in the consumer thread (aiokafka's
        loop), so no fetch moves the position in between."""
        me = cast(Any, self)
        wanted, self._changelog_redo = self._changelog_redo, {}
        thread = me._thread

        async def seek_back(consumer: Any, wanted: dict[TP, int]) -> dict[TP, int]:
            subscription = consumer._subscription.subscription
            assignment = subscription.assignment if subscription is not None else None
            moved: dict[TP, int] = {}
            for tp, offset in wanted.items():
                if assignment is None or tp not in assignment.tps:
                    continue  # revoked: its next owner's recovery reads it
                state = assignment.state_value(tp)
                if not state.has_valid_position or state.position <= offset:
                    continue  # about to be positioned, or already at or before the records
                consumer.seek(tp, offset)
                moved[tp] = offset
            return moved

        moved = await thread.call_thread(seek_back, thread._ensure_consumer(), wanted)
        for tp, offset in moved.items():
            if offset > 0:  # faust's read offset (records below it are dropped as already delivered)
                me._read_offset[tp] = offset
            else:
                me._read_offset.pop(tp, None)
            log.warning(
                "fetching %s[%d] again from offset %d (changelog records fetched but not delivered)",
                tp.topic,
                tp.partition,
                offset,
            )

    async def _register_gaps(self, tp: TP, recs: Sequence[Any], first: int, nxt: int | None) -> None:
        """Offsets missing before or between the records handed on (compaction, transaction markers) are
        faust "gaps", so that commits can move past them; consecutive offsets (the common case) are one
        comparison. `nxt` is the partition's next offset before `recs[first]` (None: unknown)."""
        me = cast(Any, self)
        start = recs[first].offset
        if nxt is not None and start > nxt:
            await me._add_gap(tp, nxt, start)
        if recs[-1].offset - start == len(recs) - 1 - first:
            return
        prev = start
        for rec in recs[first + 1 :]:
            if rec.offset - prev > 1:
                await me._add_gap(tp, prev + 1, rec.offset)
            prev = rec.offset

    async def _faust_records(self, tp: TP, recs: Sequence[Any], generation: int) -> None:
        """faust's own per-record path for a topic without a sink (changelogs during recovery, agents)."""
        me = cast(Any, self)
        get_read_offset = me._read_offset.__getitem__
        for record in recs:
            if not me.flow_active or me.app.consumer_generation_id != generation:
                self._redo_changelog("rebalance during delivery", tp, record.offset, recs[-1].offset)
                return
            offset = record.offset
            r_offset = get_read_offset(tp)
            if r_offset is not None and offset < r_offset:
                continue
            if offset - (r_offset or 0) > 1 and r_offset and me.app.topics.acks_enabled_for(tp.topic):
                await me._add_gap(tp, r_offset + 1, offset)
            commit_every = me._commit_every
            if commit_every is not None and me._n_acked >= commit_every:
                me._n_acked = 0
                await me.commit()
            if not await self._deliver(me._to_message(tp, record)):
                self._redo_changelog("delivery suspended", tp, record.offset, recs[-1].offset)
                return  # not delivered (a rebalance): fetched again from this record
            me._read_offset[tp] = offset

    async def _deliver(self, message: Any) -> bool:
        """Hand one record to faust's callback (the conductor); False when a rebalance got in the way.

        faust's drain loop does ``wait_first(callback(message), suspend_flow.wait())`` and then advances
        the read offset whether or not the callback finished; here a record whose callback lost to
        ``suspend_flow`` (a rebalance started) does not advance it, and the rest of the fetch result is
        dropped (the next recovery seeks the partition again). A CancelledError that is not a
        cancellation of the drain task itself (a callback whose queue put was cancelled by a rebalance's
        ``flow_control.clear()``, which cancels mode's ``ThrowableQueue`` putters) also counts as "not
        delivered" instead of ending the drain loop. Investigated for the take-over recovery hang (issue
        #13 section 3) and NOT shown to be its cause: faust's conductor awaits a full queue's puts with
        ``asyncio.wait``, which does not raise on their cancellation (docs/RELIABILITY.md).
        """
        me = cast(Any, self)
        delivery = me.callback(message)
        try:
            result = await me.wait_first(delivery, me.suspend_flow.wait())
        except asyncio.CancelledError:
            task = asyncio.current_task()
            cancelling = getattr(task, "cancelling", None)  # Python 3.11+; on 3.10 every cancellation ends it
            if cancelling is None or cancelling():
                raise  # the drain loop itself is being cancelled (stop)
            log.info(
                "changelog record %s[%d]@%d not delivered: queue cleared by a rebalance",
                message.topic,
                message.partition,
                message.offset,
            )
            return False
        return delivery in result.done

    async def _ingest_flush(self, sink: BatchIngest) -> None:
        me = cast(Any, self)
        batch, sink.buffer = sink.buffer, []
        generation = me.app.consumer_generation_id
        if self._ingest_suspended or not batch or sink.generation != generation:
            return  # records of an older consumer generation are never handled nor acked
        task = asyncio.ensure_future(self._ingest_run(sink, batch, generation))
        self._ingest_inflight = task
        # Shielded: if the fetcher task is cancelled (shutdown), the batch still finishes and is
        # acked, so a graceful stop never leaves half a batch in the changelog uncommitted.
        await asyncio.shield(task)
        commit_every = me._commit_every
        if (
            commit_every is not None
            and me._n_acked >= commit_every
            and (self._ingest_commit is None or self._ingest_commit.done())
        ):
            # in the background: a commit flushes the producer (a fold-in's changelog batch) and waits
            # for any commit in progress, which blocked the drain loop (counting) for up to ~2 s
            me._n_acked = 0
            self._ingest_commit = asyncio.ensure_future(me.commit())

    async def _ingest_run(self, sink: BatchIngest, batch: list[Any], generation: int) -> None:
        me = cast(Any, self)
        started = time.monotonic()
        try:
            completion = await sink.handler(batch)
        except Exception as exc:
            log.exception("ingest handler for %r failed; batch of %d not acked", sink.topic_name, len(batch))
            self._ingest_suspended = True
            await me.app.crash(exc)
            raise
        previous = self._ingest_pending
        if completion is None and (previous is None or previous.done()):
            self._ingest_ack(sink.topic_name, batch, generation)
            sink.batches += 1
            sink.events += len(batch)
        else:  # ack when the completion (and every earlier one) has finished: acks stay in batch order
            self._ingest_pending = asyncio.ensure_future(
                self._ingest_complete(sink, batch, generation, completion, previous)
            )
        handled = time.monotonic()
        # changelog writes went to the producer buffer: wait for it like the conductor does
        await me.app.producer.buffer.wait_until_ebb()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: batch of %d handled in %.1f ms, producer buffer ebbed in %.1f ms",
                sink.topic_name,
                len(batch),
                (handled - started) * 1e3,
                (time.monotonic() - handled) * 1e3,
            )

    async def _ingest_complete(
        self,
        sink: BatchIngest,
        batch: list[Any],
        generation: int,
        completion: Awaitable[Any] | None,
        previous: asyncio.Task[bool] | None,
    ) -> bool:
        """Ack `batch` once `previous` succeeded and `completion` finished; False (nothing acked) else."""
        me = cast(Any, self)
        if previous is not None and not await asyncio.shield(previous):
            return False  # an earlier batch failed: never commit past it
        if completion is not None:
            try:
                await completion
            except Exception as exc:
                log.exception("completion of a %r batch of %d failed; not acked", sink.topic_name, len(batch))
                self._ingest_suspended = True
                await me.app.crash(exc)
                return False
        self._ingest_ack(sink.topic_name, batch, generation)
        sink.batches += 1
        sink.events += len(batch)
        return True

    def _ingest_ack(self, topic: str, batch: Sequence[Any], generation: int) -> None:
        """Record acks for ``batch`` (records of ``topic`` fetched in consumer ``generation``) in bulk
        (what ``Consumer.ack`` does per message); nothing when the generation changed since."""
        me = cast(Any, self)
        if generation != me.app.consumer_generation_id or not batch:
            return
        by_partition: dict[int, list[int]] = {}
        for m in batch:
            by_partition.setdefault(m.partition, []).append(m.offset)
        by_tp = {TP(topic, p): offsets for p, offsets in by_partition.items()}
        assignment = me.assignment()
        now = time.monotonic()
        inbound = me.app.monitor.stream_inbound_time
        with ack_lock:
            for tp, offsets in by_tp.items():
                if tp not in assignment:
                    log.debug("not acking %d records of revoked %s", len(offsets), tp)
                    continue
                committed = me._committed_offset[tp]
                if committed is not None and offsets[0] < committed:
                    offsets = [o for o in offsets if o >= committed]
                acked_index = me._acked_index[tp]
                new = set(offsets).difference(acked_index)
                if not new:
                    continue
                acked_index.update(new)
                me._acked[tp].extend(sorted(new))
                me._n_acked += len(new)
                inbound[tp] = now  # keeps faust's "stream idle" livelock warnings quiet
            notify(me._waiting_for_ack)

    # ---------------------------------------------------------------- rebalance / stop
    async def _ingest_quiesce(self, why: str, deadline_s: float | None = None) -> None:
        """Stop handing records to handlers, drop unprocessed buffers, await the batch in flight and its
        completion (at most ``deadline_s`` for the completion: a stop must not hang on a stuck write; its
        batches stay unacked and are re-delivered)."""
        me = cast(Any, self)
        self._ingest_suspended = True
        dropped = 0
        for sink in _sinks(me.app).values():
            dropped += len(sink.buffer)
            sink.buffer = []
        task = self._ingest_inflight
        if task is not None and not task.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        pending = self._ingest_pending  # read after the handler finished: it may have added a completion
        if pending is not None and not pending.done():
            try:
                await asyncio.wait_for(asyncio.shield(pending), deadline_s)
            except asyncio.TimeoutError:
                log.error(
                    "ingest %s: batch completions still running after %.0f s; their records stay unacked "
                    "(re-delivered to the next owner)",
                    why,
                    deadline_s,
                )
            except Exception:  # a failed completion already crashed the app
                pass
        log.info("ingest quiesced (%s): dropped %d buffered records (re-delivered later)", why, dropped)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        me = cast(Any, self)
        if revoked:
            for tp in revoked:
                self._ingest_next.pop(tp, None)
                self._ingest_reseek.discard(tp)
            await self._ingest_quiesce("revoke")
            # faust forgets pending acks of revoked partitions before it commits; commit the
            # processed batches now, while the generation is still valid.
            try:
                await me.commit()
            except Exception as exc:  # the next owner re-processes them (at-least-once)
                log.warning("commit before revocation failed: %r", exc)
        await super().on_partitions_revoked(revoked)  # type: ignore[misc]

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        # New generation: records now flow only after faust's recovery resumes the flow.
        self._ingest_suspended = False
        self._shorten_fetch_wait()
        await super().on_partitions_assigned(assigned, generation_id)  # type: ignore[misc]

    def _shorten_fetch_wait(self) -> None:
        """Cap the broker's wait for a fetch at FETCH_MAX_WAIT_MS (faust creates the aiokafka consumer with
        1500 ms). aiokafka sends one fetch per broker at a time, for the partitions whose records were all
        consumed; when the ingest partitions still hold records at that moment, the fetch asks only for
        idle partitions (changelogs, other topics) and the broker holds it for the full wait, so the
        ingest partitions were fetched ~1.5 s late (measured: fetches of ~32K records every ~1.6 s)."""
        fetcher = getattr(getattr(getattr(self, "_thread", None), "_consumer", None), "_fetcher", None)
        if fetcher is not None and getattr(fetcher, "_fetch_max_wait_ms", 0) > FETCH_MAX_WAIT_MS:
            fetcher._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
            log.info("fetch max wait set to %d ms", FETCH_MAX_WAIT_MS)

    async def wait_empty(self) -> None:
        await self._ingest_quiesce("wait_empty", deadline_s=STOP_COMPLETION_S)
        await super().wait_empty()  # type: ignore[misc]
