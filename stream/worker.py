"""The stream worker: Kafka play events -> counts -> exact fold-in -> live recommendations.

One `StreamWorker` owns a faust app with:

- the `plays` topic, consumed in micro-batches (stream.ingest.BatchIngest): events are validated
  (invalid ones go to `plays.dead-letter` with their bytes and a reason), plays produced to another
  partition than their user's are forwarded there through `plays.repartition` (stream/repartition.py)
  and counted by its owner, streams (>= 30 s) are
  aggregated per user within the batch and added to the `user-plays` table (user -> {track: count});
- user fold-in: every user whose counts changed in a batch gets the exact half-step against the
  current item factors from their FULL counts, batched; vectors live in the `user-vectors` table so
  they survive restarts and rebalances;
- track fold-in: each fold-in sends the listener's streams of the tracks the model does not know,
  with the listener's vector and its model version, to `track-plays` (keyed by track); the owner of
  the track's partition keeps bounded per-track statistics in the `track-listeners` table
  (stream/track_state.py) and, from `min_listeners` listeners with vectors on, solves the exact item
  half-step (again at every doubling, and within 5 s of the last change) and publishes the
  version-tagged vector on the compacted `track-vectors` topic, which every worker reads and inserts
  into its index when it matches its live model;
- the model: loaded (memory-mapped) from the store at start, swapped when `model-updates` announces
  a version (or CURRENT changes), after which the worker re-folds its users against the new model.

Tables are partitioned like `plays` (by user id), so the worker that counts a user's plays also
holds the user's vector and answers for the user; requests reaching another worker are routed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import faust
import numpy as np

from batch.model_store import ModelStore, ModelStoreError
from batch.plays import MIN_MS_PLAYED
from batch.user_state import (
    EVENT_DIGEST_BYTES,
    USER_STATE_TABLE,
    UserState,
    UserStateError,
    changelog_topic,
    event_digest,
    has_digest,
    pack_user,
    unpack_user,
)
from stream.broadcast import BroadcastReader, read_to_end
from stream.changelog import BulkTableWriter, Entries
from stream.codec import (
    pack_message,
    parse_model_update,
)
from stream.events import decode_play
from stream.ingest import BatchIngest, add_seek_hook
from stream.internal_records import decode_takedown, decode_track_play, decode_track_vector
from stream.live_model import LiveModel
from stream.metrics import WorkerMetrics, dead_letter_kind
from stream.partitioning import KeyPartitioner
from stream.repartition import read_source, source_header
from stream.settings import WorkerSettings
from stream.source_replay import SourceReplay
from stream.table_store import StateTable
from stream.topics import LISTENERS_TABLE
from stream.track_state import (
    Listener,
    TrackStats,
    confidence_weight,
    listener_key,
    pack_listener,
    pack_stats,
    stats_key,
    unpack_listener,
    unpack_stats,
)

log = logging.getLogger(__name__)

#: Seconds between checks of the store's CURRENT pointer (a fallback for a missed announcement).
CURRENT_POLL_S = 5.0
#: Most distinct tracks a user's row keeps (~25 B each: 10,000 keep a row near 250 KB, well under Kafka's
#: 1 MB message limit); past it the least-played tracks are dropped down to 90% of it (docs/STREAM.md).
MAX_USER_TRACKS = 10_000
#: A `_Pending.before` no cached system has: the fold-in rebuilds the user's system from full counts.
REBUILD_STAMP = -2
#: Seconds between re-solves of new tracks whose listeners changed since their last solve.
TRACK_RESOLVE_S = 5.0
#: Most new tracks re-solved per TRACK_RESOLVE_S (each is announced to every worker).
MAX_TRACK_RESOLVES = 1000
#: Users re-folded per batch after a model swap.
REFOLD_BATCH = 2000
#: Decoded user-state rows kept in memory (the cache is dropped, and refilled lazily from the table's
#: store, when it grows past this, on partition revocation and when the consumer generation changes).
STATE_CACHE_USERS = 500_000
#: Events counted but not yet folded in and written after which counting waits for the running fold-in
#: (bounds the batches held unacked; fold-ins merge whatever was counted while the previous one ran).
MAX_UNFOLDED_EVENTS = 200_000
#: Event ids remembered per user (in the user's row) to skip a play a client sends again: a listener
#: streams at most ~2 plays a minute, so this spans a client's retries by a wide margin.
RECENT_EVENT_IDS = 64
_KEPT_DIGEST_BYTES = -(RECENT_EVENT_IDS - 1) * EVENT_DIGEST_BYTES  # slice start: the newest 63 digests
#: Rows a fold-in prepares for its changelog write between two yields to the event loop (counting, requests).
WRITE_YIELD_USERS = 1000


class StreamWorker:
    """A faust worker serving playrec's speed layer; `app` is the faust.App to run."""

    def __init__(self, settings: WorkerSettings) -> None:
        settings.validate()
        self.settings = settings
        self.metrics = WorkerMetrics()
        self.store = ModelStore(settings.store)
        self.live: LiveModel | None = None
        #: folded-in track -> (vector, model version it was solved against), as `track-vectors` says
        self.track_vectors: dict[str, tuple[np.ndarray, str | None]] = {}
        self.partitioner = KeyPartitioner(settings.partitions)
        self._fold_task: asyncio.Future | None = None  # the fold-in (solve + write) running, if any
        #: users counted since the last fold-in started, the completion of their batches, their events
        self._pending: dict[str, _Pending] = {}
        self._pending_done: asyncio.Future | None = None
        self._unfolded_events = 0
        #: users whose counts dicts the running fold-in reads (counting copies them before a change)
        self._frozen: set[str] = set()
        self._replaced: dict[str, np.ndarray | None] = {}  # user -> vector before the running fold-in
        #: fold-ins started so far; user -> the fold-in that will first reflect streams counted for the user
        #: (a user listed here has a vector behind their counts: requests solve them on the fly)
        self._fold_seq = 0
        self._stale: dict[str, int] = {}
        #: user -> decoded row, ahead of the table's store by the users counted but not yet written
        #: (rows are written when their fold-in finishes, before their batches are acked).
        self._states: dict[str, UserState] = {}
        self._states_generation: int | None = None
        self._swap_lock = asyncio.Lock()
        #: the re-fold after a swap (a tracked task: stopped before partitions are revoked) and its stop flag
        self._refold_task: asyncio.Task | None = None
        self._refold_stop = False
        #: new tracks of this worker's track-plays partitions whose listeners changed since their last solve
        self._dirty_tracks: dict[str, None] = {}
        P = settings.partitions
        self.topics = topics = settings.topics
        self.app = app = faust.App(
            settings.app_id,
            broker=f"kafka://{settings.bootstrap}",
            broker_credentials=settings.security.faust_credentials(),
            store=settings.table_store,
            datadir=str(settings.state_dir),
            Table=StateTable,
            topic_partitions=P,
            topic_replication_factor=1,
            key_serializer="raw",
            value_serializer="raw",
            web_enabled=True,
            web_bind=settings.bind or settings.host,
            web_host=settings.host,
            web_port=settings.port,
            canonical_url=settings.url,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            table_standby_replicas=0,
            broker_session_timeout=settings.session_timeout_s,
            broker_heartbeat_interval=max(1.0, settings.session_timeout_s / 10),
            broker_request_timeout=max(90.0, settings.session_timeout_s + 30),
            web_in_thread=False,
        )
        raw = {"key_serializer": "raw", "value_serializer": "raw"}
        # Changelog partitions come from the producer's murmur2 partitioner on the key bytes (the Java
        # client's and kafka-python's): a user's counts, vector and plays share one partition number;
        # plays produced elsewhere (another client's partitioner) are forwarded to it (repartition).
        table = {"partitions": P, "use_partitioner": True, "key_type": bytes, "value_type": bytes}
        # user -> {counts per track, folded-in vector}: one changelog record per changed user
        self.users = app.Table(USER_STATE_TABLE, **table)
        self.listeners = app.Table(LISTENERS_TABLE, **table)
        for watched in (self.users, self.listeners):
            self.metrics.watch_table(watched)
        self.user_writer = BulkTableWriter(app, self.users, topics.plays)
        self.listener_writer = BulkTableWriter(app, self.listeners, topics.track_plays)
        self.dead_letter = app.topic(topics.dead_letter, partitions=P, **raw)
        self.track_plays = app.topic(topics.track_plays, partitions=P, **raw)
        self.plays_forward = app.topic(topics.repartition, partitions=P, **raw)
        self.plays_ingest = BatchIngest(
            app,
            topics.plays,
            self.on_plays,
            max_batch=settings.max_batch,
            max_latency_s=settings.max_latency_s,
            ready=self.plays_ready,
        )
        self.forward_ingest = BatchIngest(
            app,
            topics.repartition,
            self.on_forwarded_plays,
            max_batch=settings.max_batch,
            max_latency_s=settings.max_latency_s,
            ready=self.plays_ready,
        )
        self.track_ingest = BatchIngest(
            app, topics.track_plays, self.on_track_plays, max_batch=5000, max_latency_s=settings.max_latency_s
        )
        client_kwargs = settings.security.aiokafka_kwargs()

        def broadcast(topic: str, callback: Any, from_beginning: bool) -> BroadcastReader:
            reader = BroadcastReader(settings.bootstrap, topic, callback, from_beginning, client_kwargs)
            app.task(reader.run)
            return reader

        self.model_reader = broadcast(topics.model_updates, self.on_model_updates, from_beginning=False)
        self.track_reader = broadcast(topics.track_vectors, self.on_track_vectors, from_beginning=True)
        self.takedown_reader = broadcast(topics.track_takedowns, self.on_takedowns, from_beginning=True)

        async def record_repair(partition: int, value: bytes) -> Any:
            return await app.producer.send_and_wait(
                topics.repairs, str(partition).encode(), value, partition=None, timestamp=None, headers=None
            )

        #: user-state partitions whose changelog lost records are restored from plays (stream/source_replay.py)
        async def read_repairs() -> list[Any]:
            return await read_to_end(settings.bootstrap, topics.repairs, client_kwargs)

        self.source_replay = SourceReplay(
            app,
            changelog_topic(settings.app_id),
            topics.plays,
            topics.repartition,
            record_repair,
            read_repairs,
            self.rewrite_user_rows,
        )
        add_seek_hook(app, self.source_replay.rewinds)
        self.metrics.watch_source_replay(self.source_replay)
        #: track -> taken down (True) or restored (False), as the compacted take-down topic says
        self.takedowns: dict[str, bool] = {}
        #: track -> the reason given with its latest take-down (shown by the operator's console)
        self.takedown_reasons: dict[str, str] = {}
        self._lag_partitions: set[int] = set()  # partitions with a `playrec_consumer_partition_lag` series
        app.on_partitions_revoked.connect(self._on_partitions_revoked)
        app.timer(CURRENT_POLL_S)(self.poll_current)
        app.timer(2.0)(self.update_lag)
        app.timer(TRACK_RESOLVE_S)(self.resolve_tracks)
        from stream.web import register_views

        register_views(self)
        self.load_current()

    # -- model ---------------------------------------------------------------------------------
    def load_current(self) -> bool:
        """Load the store's CURRENT version if it differs from the live one; True when swapped (start-up,
        before the event loop runs)."""
        version = self._current_version()
        if version is None:
            return False
        takedowns, vectors = dict(self.takedowns), dict(self.track_vectors)
        live = self._build_live(version, takedowns, vectors)
        return live is not None and self._install(live, takedowns, vectors)

    def _current_version(self) -> str | None:
        """The store's CURRENT version when it differs from the live one, else None."""
        try:
            version = self.store.current_version()
        except ModelStoreError as exc:
            if self.live is None:
                log.warning("no model yet (%s); counting plays and waiting for a model", exc)
            return None
        if self.live is not None and self.live.version == version:
            return None
        return version

    def _build_live(
        self, version: str, takedowns: Mapping[str, bool], vectors: Mapping[str, tuple[np.ndarray, str | None]]
    ) -> LiveModel | None:
        """Load `version` and build its LiveModel with the take-downs and folded-in track vectors of a
        snapshot (any thread: it reads nothing the event loop mutates); None when it cannot be loaded."""
        try:
            model = self.store.load(version)
        except ModelStoreError as exc:
            log.error("cannot load model %s: %s; keeping %s", version, exc, self.live and self.live.version)
            return None
        live = LiveModel(model, search_k=self.settings.search_k)
        live.take_down(t for t, down in takedowns.items() if down)
        servable = servable_tracks(live, vectors)
        if servable:
            live.add_tracks(servable)
        return live

    def _install(
        self, live: LiveModel, takedowns: Mapping[str, bool], vectors: Mapping[str, tuple[np.ndarray, str | None]]
    ) -> bool:
        """Make `live` (built from the snapshot `takedowns` / `vectors`) the live model, on the event loop:
        first replay the take-downs and track vectors that arrived while it was built (the handlers
        change `self.takedowns` / `self.track_vectors` on this loop only), then swap in one assignment,
        with no await in between, so no take-down is lost and none is served."""
        for track, down in self.takedowns.items():
            if takedowns.get(track) != down:
                (live.take_down if down else live.restore)([track])
        arrived = servable_tracks(live, {t: e for t, e in self.track_vectors.items() if vectors.get(t) is not e})
        if arrived:
            live.add_tracks(arrived)
        self.live = live  # one assignment: requests see the old or the new model, never a mix
        self.metrics.model_loads.inc()
        self.metrics.new_tracks.set(len(live.new_ids))
        log.info(
            "model %s live: %d users x %d tracks, %d folded-in tracks",
            live.version,
            len(live.user_index),
            len(live.item_index),
            len(live.new_ids),
        )
        return True

    async def poll_current(self) -> None:
        await self._load_and_refold(None)

    async def on_model_updates(self, records: list[Any]) -> None:
        for record in records:
            try:
                update = parse_model_update(record.value)
            except ValueError as exc:
                log.warning("ignoring a malformed model update at offset %s: %s", record.offset, exc)
                continue
            await self._load_and_refold(update["version"])

    async def _load_and_refold(self, version: str | None) -> None:
        """Swap to `version` (None: the store's CURRENT) if it is not live, then re-fold the local users.
        The model is built off the loop from a snapshot of the take-downs and track vectors, and
        installed on the loop (`_install`), which replays what arrived meanwhile."""
        async with self._swap_lock:
            loop = asyncio.get_running_loop()
            if version is None:
                version = await loop.run_in_executor(None, self._current_version)
                if version is None:
                    return
            elif self.live is not None and self.live.version == version:
                return
            takedowns, vectors = dict(self.takedowns), dict(self.track_vectors)
            live = await loop.run_in_executor(None, self._build_live, version, takedowns, vectors)
            if live is not None and self._install(live, takedowns, vectors):
                await self._stop_refold()  # a re-fold against the previous model is moot now
                self._refold_stop = False
                self._refold_task = asyncio.ensure_future(self.refold_local_users())

    async def _stop_refold(self) -> None:
        """Stop the re-fold and wait until it has returned: it finishes at most the chunk it is solving
        (whose write, if it reached it, has been acknowledged) and writes nothing after this returns."""
        task = self._refold_task
        if task is None or task.done():
            return
        self._refold_stop = True
        with contextlib.suppress(Exception):  # its failure is logged by itself
            await asyncio.shield(task)

    async def refold_local_users(self) -> None:
        """After a swap: re-solve every user of the partitions this worker holds against the new model, a
        chunk at a time. Runs as `_refold_task`: a revocation (or a newer swap) stops it between chunks,
        and a chunk writes only rows of partitions still assigned, so no row of a partition another worker
        owns now is written. Users it did not reach are solved on their next play or request
        (`serving_vector` never serves a vector of another model version)."""
        live = self.live
        if live is None:
            return
        try:
            await self._refold(live)
        except Exception:
            log.exception(
                "re-fold against model %s failed; users are solved on their next play or request", live.version
            )

    async def _refold(self, live: LiveModel) -> None:
        users = list(dict.fromkeys([*(key for key, _ in self.users.items()), *(u.encode() for u in self._states)]))
        loop = asyncio.get_running_loop()
        written = 0
        for start in range(0, len(users), REFOLD_BATCH):
            if self._refold_stop or self.live is not live:
                log.info("re-fold against model %s stopped after %d of %d users", live.version, written, len(users))
                return
            states = {}
            for key in users[start : start + REFOLD_BATCH]:
                try:
                    states[key.decode()] = self.user_state(key.decode())
                except (UnicodeDecodeError, UserStateError) as exc:
                    log.error("user-state row %r is damaged, not re-folded: %s", key[:60], exc)
            full = {user: live.full_counts(user, state.counts) for user, state in states.items()}
            vectors = await loop.run_in_executor(None, live.fold_in_users, full)
            if self._refold_stop or self.live is not live:  # revoked (or swapped again) while solving
                continue
            assigned = set(self.assigned_partitions())
            entries, olds, news = [], [], []
            for user, state in states.items():
                key = user.encode()
                partition = self.partitioner(key)
                if partition not in assigned:
                    continue  # another worker owns this user now: its row is not ours to write
                current = self.user_state(user)
                if current.stamp() != state.stamp():
                    continue  # plays arrived meanwhile: that batch folded the user in against this model
                vector = vectors.get(user)
                new = current._replace(version=live.version if vector is not None else None, vector=vector)
                if user in self._states:
                    self._states[user] = new
                if vector is not None:  # X^T X of the new model holds the user's model row (or nothing)
                    old = live.model_user_vector(user)
                    olds.append(np.zeros(live.k, np.float32) if old is None else old)
                    news.append(vector)
                entries.append((key, pack_user(new), partition))
            if news:  # (additive: its order against a concurrent fold-in's update does not matter)
                live.users_moved(np.stack(olds), np.stack(news))
            # the new tracks they streamed are solved again from the new vectors: durable before the rows,
            # as in `_fold_in` (a kill in between re-folds them after the restart, which sends them again)
            updates = []
            for key, _, _ in entries:
                user = key.decode()
                if vectors.get(user) is not None:
                    counts = self.user_state(user).counts
                    updates.append((user, counts, vectors[user], counts))
            await self._deliver_listener_updates(live, updates)

            def unchanged(entries=entries, states=states) -> Entries:
                """The rows of users with no plays counted since they were read: plays counted during the
                awaits above are written by their fold-in, and this older row must not land after it."""
                kept = []
                for entry in entries:
                    user = entry[0].decode()
                    try:
                        if self.user_state(user).stamp() == states[user].stamp():
                            kept.append(entry)
                    except UserStateError:
                        pass
                return kept

            kept = await self.user_writer.write_current(unchanged)
            written += kept
            self.metrics.user_fold_ins.inc(kept)
            await asyncio.sleep(0)  # let requests in between chunks
        log.info("re-folded %d of %d users against model %s", written, len(users), live.version)

    # -- plays ---------------------------------------------------------------------------------
    def user_state(self, user: str) -> UserState:
        """The user's current row: the decoded cache, else the table's store (not cached: a reader may run
        while partitions recover). Raises `UserStateError` for a damaged row."""
        state = self._states.get(user)
        return state if state is not None else unpack_user(self.users.get(user.encode()))

    def _cached_state(self, user: str) -> UserState:
        state = self._states.get(user)
        if state is None:
            state = self._states[user] = unpack_user(self.users.get(user.encode()))
        return state

    async def _check_state_cache(self) -> None:
        """Drop the decoded rows after a rebalance (the store was recovered) or when the cache is full;
        rows counted but not yet written are written first (the store does not have them yet)."""
        generation = self.app.consumer_generation_id
        if generation != self._states_generation or len(self._states) > STATE_CACHE_USERS:
            await self.drain_fold_ins()
            self._states.clear()
            self._stale.clear()
            self._states_generation = generation

    async def on_plays(self, batch: list[Any]) -> asyncio.Future | None:
        """One micro-batch of `plays` records: validate and count streams per user at once; the fold-in
        and the changelog write of the counted users follow in the background.

        Plays on another partition than their user's (a client whose partitioner is not murmur2, or a
        keyless record) are forwarded to the user's partition of `plays.repartition` (`on_forwarded_plays`).
        Counting is idempotent: each user's state records the offset of the last record applied from
        the user's own partition, so a batch re-delivered after a crash between
        the table write and the offset commit is not counted twice; a play whose `event_id` is among the
        user's RECENT_EVENT_IDS latest (a client's re-send: another record) is skipped and counted in
        `playrec_duplicate_events_total`. Counting never waits for a
        fold-in: the users counted since the last fold-in started are *pending*; when no fold-in runs,
        one starts with all of them (so fold-ins merge the batches counted while the previous one ran,
        and hot users are solved once per fold-in, not once per batch). Returns the completion of the
        fold-in that takes this batch's users (then one changelog write per user): BatchIngest acks
        the batch when it is done, so counts are durable before their offsets are committed.
        """
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        events: dict[tuple[str, int | None], list[tuple[int, str, int, str | None]]] = defaultdict(list)
        partitions: dict[str, int] = {}
        partition_of = self.partitioner
        for message in batch:
            event, reason = decode_play(message.key, message.value, now_ms)
            if event is None:
                await self._dead_letter(message, reason)
                continue
            key = message.key if message.key is not None else event.user.encode("utf-8")
            home = partition_of(key)
            if message.partition != home:  # another client's partitioner: counted by the user's partition
                await self._forward(message, key, home)
                continue
            events[event.user, None].append((message.offset, event.track, event.ms_played, event.event_id))
            partitions[event.user] = home
        completion = await self._count(events, partitions, len(batch), started)
        self.source_replay.track(batch, completion)
        return completion

    async def on_forwarded_plays(self, batch: list[Any]) -> asyncio.Future | None:
        """One micro-batch of `plays.repartition` records (plays another worker read from a partition other
        than their user's): validated like plays, plus the forwarding header and the partition; each is
        applied once per (user, source partition) by its source offset (a forwarder re-sends a suffix
        after a crash). Returns the completion like `on_plays`."""
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        events: dict[tuple[str, int | None], list[tuple[int, str, int, str | None]]] = defaultdict(list)
        partitions: dict[str, int] = {}
        partition_of, P = self.partitioner, self.settings.partitions
        for message in batch:
            event, reason = decode_play(message.key, message.value, now_ms)
            source = read_source(message.headers, P) if event is not None else None
            if isinstance(source, str):
                event, reason = None, source
            elif event is not None and message.key is None:
                event, reason = None, "forwarded play without a key"
            elif event is not None and message.partition != partition_of(message.key):
                event, reason = None, f"forwarded play on partition {message.partition}, not its user's"
            elif event is not None and source[0] == message.partition:
                event, reason = None, "forwarded play from its own user's partition"
            if event is None:
                await self._dead_letter(message, reason)
                continue
            events[event.user, source[0]].append((source[1], event.track, event.ms_played, event.event_id))
            partitions[event.user] = message.partition
        completion = await self._count(events, partitions, len(batch), started)
        self.source_replay.track(batch, completion)
        return completion

    async def _forward(self, message: Any, key: bytes, home: int) -> None:
        """Re-send a play read from the wrong partition to its user's partition of `plays.repartition`
        (delivered before the batch's offsets are committed: faust's commit flushes the producer)."""
        self.metrics.forwarded.inc()
        await self.plays_forward.send(
            key=key,
            value=message.value,
            partition=home,
            timestamp=message.timestamp / 1000.0 if message.timestamp else None,
            headers=[source_header(message.partition, message.offset)],
        )

    async def _count(
        self,
        events: dict[tuple[str, int | None], list[tuple[int, str, int, str | None]]],
        partitions: dict[str, int],
        n_records: int,
        started: float,
    ) -> asyncio.Future | None:
        """Count `events` {(user, source partition or None for the user's own): [(offset, track, ms_played,
        event_id)] in offset order} into the users' rows, skipping what each row already applied; the
        counted users become pending for the next fold-in, whose completion is returned."""
        if self._unfolded_events >= MAX_UNFOLDED_EVENTS:  # fold-ins fell behind: wait for the one running
            await self._wait_fold_task()
        await self._check_state_cache()
        applied = streams = duplicates = 0
        cached = self._cached_state
        frozen = self._frozen
        pending = self._pending
        stale, next_fold = self._stale, self._fold_seq + 1
        for (user, source), plays in events.items():
            state = cached(user)
            if source is None:
                applied_offset = state.offset
            else:
                applied_offset = -1 if state.sources is None else state.sources.get(source, -1)
            fresh = fresh_plays(plays, applied_offset)
            if not fresh:
                continue  # re-delivered after a crash: already counted
            counts = state.counts  # the cached row's dict, updated in place ...
            if user in frozen:  # ... unless the running fold-in reads it: copy on write (once)
                counts = dict(counts)
                frozen.discard(user)
            entry = pending.get(user)
            if entry is None:
                entry = pending[user] = _Pending(state.stamp(), {}, partitions[user])
            added = entry.added
            before = streams
            recent = state.recent
            for _, track, ms_played, event_id in fresh:
                if event_id is not None:  # a client's re-send of a play already applied is skipped
                    digest = event_digest(event_id)
                    if has_digest(recent, digest):
                        duplicates += 1
                        continue
                    recent = recent[_KEPT_DIGEST_BYTES:] + digest
                applied += 1
                if ms_played >= MIN_MS_PLAYED:
                    added[track] = added.get(track, 0) + 1
                    counts[track] = counts.get(track, 0) + 1
                    streams += 1
            if streams > before:
                stale[user] = next_fold
            if len(counts) > MAX_USER_TRACKS:  # a bounded row: the least-played tracks make room
                for track in trim_counts(counts, MAX_USER_TRACKS * 9 // 10):
                    added.pop(track, None)
                    self.metrics.tracks_trimmed.inc()
                entry.before = REBUILD_STAMP  # the fold-in solves the user from the kept counts, not incrementally
            if source is None:
                self._states[user] = state._replace(counts=counts, offset=fresh[-1][0], recent=recent)
            else:
                sources = dict(state.sources or {})
                sources[source] = fresh[-1][0]
                self._states[user] = state._replace(counts=counts, recent=recent, sources=sources)
        self.metrics.events.inc(applied)
        if duplicates:
            self.metrics.duplicates.inc(duplicates)
        self.metrics.streams.inc(streams)
        self.metrics.batch_events.observe(n_records)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        if not pending:
            return None
        self._unfolded_events += n_records
        if self._pending_done is None:
            self._pending_done = asyncio.get_running_loop().create_future()
        done = self._pending_done
        if self._fold_task is None or self._fold_task.done():
            self._start_fold_in()
        return done

    def _start_fold_in(self) -> None:
        """Hand every pending user to a new fold-in task (none may be running)."""
        pending, self._pending = self._pending, {}
        done, self._pending_done = self._pending_done, None
        self._unfolded_events = 0
        self._fold_seq += 1
        states = {user: self._states[user] for user in pending}
        self._frozen = set(states)  # their counts dicts are read by the fold-in: counting copies them
        self._fold_task = asyncio.ensure_future(self._fold_in(self.live, states, pending, done, self._fold_seq))

    def serving_vector(self, live: LiveModel, user: str, counts: Mapping[str, int]) -> tuple[np.ndarray | None, str]:
        """The vector that answers for `user` (streamed `counts`) and its source: "fold-in" (the stored
        fold-in vector, or one solved here from the user's counts when there is none yet or streams were
        counted that the background fold-in has not published: an answer always reflects every play
        counted), "model" (the model's row: no streams counted) or "popularity" (None: no known track)."""
        stored = self.user_state(user)
        if stored.vector is not None and stored.version == live.version and user not in self._stale:
            return stored.vector, "fold-in"
        row = live.model_user_vector(user)
        if counts:
            solved = live.fold_in_users({user: live.full_counts(user, counts)})
            if user in solved:
                return solved[user], "fold-in"
        return (None, "popularity") if row is None else (row, "model")

    def _caught_up(self, user: str, seq: int) -> None:
        """Fold-in `seq` published the user's vector: unless streams were counted for the user since it
        started (a later fold-in takes those), the stored vector reflects every counted play again."""
        if self._stale.get(user) == seq:
            del self._stale[user]

    def plays_ready(self) -> bool:
        """Whether `on_plays` can take a batch without waiting (fold-ins have not fallen behind)."""
        return self._unfolded_events < MAX_UNFOLDED_EVENTS

    async def _wait_fold_task(self) -> None:
        task = self._fold_task
        if task is not None:
            with contextlib.suppress(Exception):  # its failure reaches BatchIngest through the completion
                await asyncio.shield(task)

    async def drain_fold_ins(self) -> None:
        """Fold in and write every pending user and wait for it (rebalance, stop, cache reset): returns
        only when no fold-in runs and none is pending (a finishing fold-in starts the next one itself)."""
        while True:
            task = self._fold_task
            if task is not None and not task.done():
                await self._wait_fold_task()
                continue
            if task is not None and not task.cancelled() and task.exception() is not None:
                return  # a failed write: the worker is crashing (BatchIngest got the failure), nothing to drain
            if not self._pending:
                return
            self._start_fold_in()

    async def rewrite_user_rows(self, partition: int) -> int:
        """Write every user row this worker holds for `partition` to the changelog again (after a restore
        from the source topics); returns how many. Pending fold-ins are written first, so no row written
        here is older than one written before it."""
        await self.drain_fold_ins()
        partition_of = self.partitioner

        def held_rows() -> Entries:  # built after every earlier write is stored
            return [(key, value, partition) for key, value in self.users.data.items() if partition_of(key) == partition]

        return await self.user_writer.write_current(held_rows)

    async def _on_partitions_revoked(self, app: Any, revoked: Any, **kwargs: Any) -> None:
        """Finish the counted users' fold-in and write before partitions move: their rows must reach the
        changelog before the next owner recovers them (a later write from here would overwrite the new
        owner's rows). The decoded rows are dropped: the next generation refills them from the store. A
        re-fold in progress is stopped first (it would write rows of partitions that move)."""
        await self._stop_refold()
        await self.drain_fold_ins()
        self._states.clear()
        self._stale.clear()
        self._states_generation = None

    async def _dead_letter(self, message: Any, reason: str) -> None:
        self.metrics.dead_letters.labels(dead_letter_kind(reason)).inc()
        headers = [
            ("reason", reason.encode("utf-8", "replace")),
            ("source", f"{message.topic}/{message.partition}/{message.offset}".encode()),
        ]
        await self.dead_letter.send(key=message.key, value=message.value or b"", headers=headers)

    async def _fold_in(
        self,
        live: LiveModel | None,
        states: dict[str, UserState],
        pending: dict[str, _Pending],
        done: asyncio.Future | None,
        seq: int,
    ) -> None:
        """Fold-in number `seq`: solve the pending users' vectors (off the event loop), write every row once
        (counts, offset, vector) and make it durable, then resolve `done` (the completion of the batches
        counted into `pending`) and start the next fold-in if users were counted meanwhile. A failed solve
        is logged (the counts are still written); a failed write fails `done` (those batches are not acked)."""
        try:
            vectors = await self._solve_and_write(live, states, pending, seq)
        except BaseException as exc:
            if done is not None and not done.done():
                done.set_exception(exc)
                done.exception()  # retrieved here too: BatchIngest reports it
            raise
        finally:
            self._frozen = set()
        if done is not None and not done.done():
            done.set_result(vectors)
        if self._pending:  # counted while this fold-in ran (it is `_fold_task`: none other can start meanwhile)
            self._start_fold_in()

    async def _solve_and_write(
        self, live: LiveModel | None, states: dict[str, UserState], pending: dict[str, _Pending], seq: int
    ) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        vectors: dict[str, np.ndarray] = {}
        rows: dict[str, bytes] = {}
        if live is not None:
            for user, entry in pending.items():
                if not entry.added:  # the offset moved without streams: a cached system stays valid
                    live.advance(user, entry.before, states[user].stamp())
            if any(entry.added for entry in pending.values()):
                vectors, rows = await self._solve(live, states, pending, seq)
        entries, olds, news = [], [], []
        swapped = self.live is not live  # the rows packed with the fold-in's vectors may be stale: repack
        replaced = self._replaced
        self._replaced = {}
        for i, (user, state) in enumerate(states.items(), 1):
            self._caught_up(user, seq)  # (also a user without known tracks: no vector, the fallback serves them)
            vector = vectors.get(user)
            current = self._states.get(user, state)  # may hold counts of batches counted since (consistent)
            if vector is not None and not (
                swapped and current.vector is not None and current.version != live.version  # re-folded
            ):
                if user in replaced:
                    old = replaced[user]
                else:
                    old = current.vector if current.version == live.version else live.model_user_vector(user)
                olds.append(np.zeros(live.k, np.float32) if old is None else old)
                news.append(vector)
                current = current._replace(version=live.version, vector=vector)
                if user in self._states:
                    self._states[user] = current  # the recommendations reflect the plays from here on
            row = None if swapped else rows.get(user)
            entries.append((user.encode(), pack_user(current) if row is None else row, pending[user].partition))
            if i % WRITE_YIELD_USERS == 0:
                await asyncio.sleep(0)  # let counting and requests in
                swapped = self.live is not live  # (a model swap may have happened meanwhile)
        if news:
            live.users_moved(np.stack(olds), np.stack(news))
        # Tracks the model does not know learn from their listeners: a new vector updates the user's
        # contribution to every such track they streamed (also those streamed before they had a vector).
        # These records carry absolute counts (a re-send is idempotent) and are made durable BEFORE the
        # rows: a kill between the two re-delivers the plays (their rows are not in the changelog yet),
        # which sends them again; the other order would lose them (the restored rows make the
        # re-delivered plays look counted, so nothing re-sends the track side).
        updates = []
        for user, entry in pending.items() if live is not None else ():
            vector = vectors.get(user)
            updates.append(
                (user, states[user].counts, vector, states[user].counts if vector is not None else entry.added)
            )
        await self._deliver_listener_updates(live, updates)
        await self.user_writer.write(entries)
        self.metrics.fold_in_seconds.observe(time.perf_counter() - started)
        self.metrics.user_fold_ins.inc(len(vectors))
        return vectors

    async def _deliver_listener_updates(
        self,
        live: LiveModel,
        updates: Iterable[tuple[str, Mapping[str, int], np.ndarray | None, Iterable[str]]],
    ) -> None:
        """For each (user, counts, vector, tracks): send the user's streams of each of `tracks` the model does
        not know, with the user's `vector` (of model `live.version`; None: counts only), to the track's owner
        on `track-plays`; returns once every record is delivered."""
        sent = []
        for user, counts, vector, tracks in updates:
            x = None if vector is None else np.asarray(vector, "<f4").tobytes()
            for track in tracks:
                if track in live.item_index:
                    continue
                body = {"track": track, "user": user, "count": int(counts[track]), "x": x, "v": live.version}
                sent.append(await self.track_plays.send(key=track.encode(), value=pack_message(body)))
        if sent:
            await asyncio.gather(*sent)

    async def _solve(
        self, live: LiveModel, states: dict[str, UserState], pending: dict[str, _Pending], seq: int
    ) -> tuple[dict[str, np.ndarray], dict[str, bytes]]:
        """In a thread: the users' changes, `live.fold_in_users` and the packed rows (the fold-in's counts
        with the new vectors: those dicts are frozen while it runs). Each group of vectors is published on
        the event loop as soon as it is solved (`self._replaced` keeps the vectors they replaced, for
        `users_moved`). Returns ({user: vector}, {user: packed row})."""
        loop = asyncio.get_running_loop()
        replaced = self._replaced

        def publish(solved: dict[str, np.ndarray]) -> None:
            """On the event loop: recommendations reflect the plays from here on (the rows reach the
            changelog after the whole fold-in, before its batches are acked)."""
            if self.live is not live:
                return  # swapped meanwhile: the re-fold decides
            for user, vector in solved.items():
                current = self._states.get(user)
                if current is None:
                    continue
                if user not in replaced:
                    replaced[user] = current.vector if current.version == live.version else live.model_user_vector(user)
                self._states[user] = current._replace(version=live.version, vector=vector)
                self._caught_up(user, seq)

        def on_solved(solved: dict[str, np.ndarray]) -> None:  # fold-in thread
            loop.call_soon_threadsafe(publish, solved)

        def fold() -> tuple[dict[str, np.ndarray], dict[str, bytes]]:
            """Reads only the fold-in's own `states` and `pending` (handed over, frozen)."""
            changes = {
                user: live.change(user, entry.before, states[user].stamp(), entry.added, states[user].counts)
                for user, entry in pending.items()
                if entry.added
            }
            full = _FullCounts(live, {user: states[user] for user in changes})
            try:
                vectors = live.fold_in_users(full, changes, on_solved)
            except Exception:
                log.exception("fold-in failed; its users are folded in again on their next plays")
                vectors = {}
            version = live.version
            rows = {
                user: pack_user(state if user not in vectors else state._replace(version=version, vector=vectors[user]))
                for user, state in states.items()
            }
            return vectors, rows

        return await loop.run_in_executor(None, fold)

    # -- new tracks ----------------------------------------------------------------------------
    async def on_track_plays(self, batch: list[Any]) -> None:
        """One micro-batch of `track-plays`: each record is a listener's current streams of a new track and
        their vector (stream/track_state.py). The listener's row and the track's bounded statistics are
        updated (old contribution out, new one in), rows written once per batch; a track is solved when
        it reaches `min_listeners` listeners with vectors of the live model and again at every doubling
        of them, and a changed track is re-solved by the `resolve_tracks` timer within TRACK_RESOLVE_S
        (so its vector is exact for all its listeners shortly after the last update)."""
        live = self.live
        if live is None:
            return  # no model to solve against yet: the listeners send again when they are folded in
        version, k, params = live.version, live.k, live.params
        listeners: dict[bytes, Listener] = {}
        stats: dict[str, TrackStats] = {}
        changed: set[str] = set()
        for message in batch:
            play, reason = decode_track_play(message.value)
            if play is None:  # workers write this topic, but so can anyone: dead-letter, never stop
                await self._dead_letter(message, f"track-play: {reason}")
                continue
            track = play.track
            if track in live.item_index:
                continue  # the model knows it now
            key = listener_key(track, play.user)
            old = listeners.get(key) or unpack_listener(self.listeners.get(key))
            if play.x is not None:
                new = Listener(play.count, play.x, play.version)
            else:
                new = Listener(play.count, old.x, old.version)
            track_stats = stats.get(track)
            if track_stats is None:
                track_stats = stats[track] = unpack_stats(self.listeners.get(stats_key(track)), version, k)
            if message.offset <= track_stats.offset:
                # applied to the statistics before a crash that came before this listener's row was
                # written (the statistics are written first): only the row is set again
                if new != old:
                    listeners[key] = new
                continue
            track_stats.offset = message.offset
            if new == old:
                continue  # a re-sent update
            if old.count > 0:
                track_stats.apply(old.x, old.version, confidence_weight(old.count, params), -1.0)
            if new.count > 0:
                track_stats.apply(new.x, new.version, confidence_weight(new.count, params), 1.0)
            listeners[key] = new
            changed.add(track)
        if not listeners and not changed:
            return
        solve_now: dict[str, TrackStats] = {}
        for track in changed:
            track_stats = stats[track]
            if track_stats.listeners >= self.settings.min_listeners and (
                track_stats.solved_at == 0 or track_stats.listeners >= 2 * track_stats.solved_at
            ):
                track_stats.solved_at = track_stats.listeners
                solve_now[track] = track_stats
            else:
                self._dirty_tracks[track] = None  # the timer re-solves it
        # The solved vectors are delivered BEFORE the rows that record the solve (`solved_at`): a kill
        # between the two re-delivers the batch, which solves and announces them again (the same vectors);
        # the other order lost the announcement for good (the restored rows make the re-delivered
        # records look applied, and `solved_at` says the track was announced).
        delivered = []
        for track, track_stats in solve_now.items():
            self._dirty_tracks.pop(track, None)
            delivered.append(await self._publish_track(live, track, track_stats))
        if delivered:
            await asyncio.gather(*delivered)
        # The statistics (with the offset of the last record they hold) are durable before the listener
        # rows: a kill between the two re-delivers records the statistics already hold (skipped for them,
        # their listener rows set again); the other order left listener rows whose contributions the
        # statistics lacked, and the re-delivered records looked like re-sends (never counted).
        partition_of = self.partitioner
        await self.listener_writer.write(
            [(stats_key(t), pack_stats(stats[t]), partition_of(t.encode())) for t in changed]
        )
        await self.listener_writer.write(
            [(key, pack_listener(row), partition_of(key.split(b"\x00")[1])) for key, row in listeners.items()]
        )

    async def _publish_track(self, live: LiveModel, track: str, track_stats: TrackStats) -> asyncio.Future:
        """Solve `track` from its statistics against the live X^T X and announce it on `track-vectors`;
        returns the record's delivery future."""
        vector = track_stats.solve(live.user_gram, live.track_regularisation(track_stats.listeners))
        self.metrics.track_fold_ins.inc()
        body = {
            "track": track,
            "x": np.asarray(vector, "<f4").tobytes(),
            "listeners": track_stats.listeners,
            "version": track_stats.version,
        }
        return await self.app.producer.send(
            self.topics.track_vectors, track.encode(), pack_message(body), partition=None, timestamp=None, headers=None
        )

    async def resolve_tracks(self) -> None:
        """Timer: re-solve the new tracks whose listeners changed since their last solve (at most
        MAX_TRACK_RESOLVES per tick), on partitions this worker still owns."""
        live = self.live
        if live is None or not self._dirty_tracks:
            return
        assigned = set(self.assigned_partitions())
        for track in list(itertools.islice(self._dirty_tracks, MAX_TRACK_RESOLVES)):
            del self._dirty_tracks[track]
            if track in live.item_index or self.partitioner(track.encode()) not in assigned:
                continue
            track_stats = unpack_stats(self.listeners.get(stats_key(track)), live.version, live.k)
            if track_stats.listeners >= self.settings.min_listeners:
                await self._publish_track(live, track, track_stats)

    async def _dead_letter_broadcast(self, record: Any, reason: str) -> None:
        """Dead-letter a bad record of a topic every worker reads, once: by the worker that owns the
        same-numbered partition of `plays` (partition modulo P); the others only log it."""
        partition = record.partition % self.settings.partitions
        try:
            assignment = self.app.consumer.assignment()
            owned = any(tp.topic == self.topics.plays and tp.partition == partition for tp in assignment)
        except Exception:  # consumer not started yet
            owned = False
        if owned:
            await self._dead_letter(record, reason)
        else:
            log.warning("bad record %s/%s/%s: %s", record.topic, record.partition, record.offset, reason)

    async def on_track_vectors(self, records: list[Any]) -> None:
        fresh: dict[str, np.ndarray] = {}
        for record in records:
            solved, reason = decode_track_vector(record.value)
            if solved is None:
                await self._dead_letter_broadcast(record, f"track-vector: {reason}")
                continue
            entry = self.track_vectors[solved.track] = (solved.vector, solved.version)
            fresh[solved.track] = entry
        live = self.live
        servable = servable_tracks(live, fresh) if live is not None else {}
        if servable:
            live.add_tracks(servable)
            self.metrics.new_tracks.set(len(live.new_ids))

    # -- take-downs -----------------------------------------------------------------------------
    async def publish_takedown(self, track: str, taken_down: bool, reason: str = "") -> None:
        """Announce a take-down (or its undoing) to every worker on the compacted take-down topic."""
        body = {"track": track, "taken_down": taken_down, "reason": reason, "at": int(time.time() * 1000)}
        topic, key = self.topics.track_takedowns, track.encode()
        await self.app.producer.send_and_wait(
            topic, key, pack_message(body), partition=None, timestamp=None, headers=None
        )

    async def on_takedowns(self, records: list[Any]) -> None:
        changed: dict[str, bool] = {}
        for record in records:
            takedown, reason = decode_takedown(record.value)
            if takedown is None:
                await self._dead_letter_broadcast(record, f"take-down: {reason}")
                continue
            changed[takedown.track] = takedown.taken_down
            self.takedown_reasons[takedown.track] = takedown.reason if takedown.taken_down else ""
        self.takedowns.update(changed)
        live = self.live
        if live is not None:
            live.take_down(t for t, down in changed.items() if down)
            live.restore(t for t, down in changed.items() if not down)
        for track, down in changed.items():
            log.info("track %r %s", track, "taken down" if down else "restored")

    # -- health --------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): a model is live and this worker holds its partitions, not rebalancing."""
        if self.live is None:
            return False, "no model loaded"
        app = self.app
        if app.rebalancing:
            return False, "rebalancing"
        try:
            assignment = app.consumer.assignment()
        except Exception:
            return False, "consumer not started"
        if not any(tp.topic == self.topics.plays for tp in assignment):
            return False, "no partitions of plays assigned yet"
        if not app.tables.recovery.completed.is_set():
            return False, "recovering tables"
        if not self.takedown_reader.caught_up.is_set():
            return False, "reading take-downs"
        return True, "ready"

    def assigned_partitions(self) -> list[int]:
        """Partitions of `plays` this worker holds now."""
        try:
            return sorted(tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.topics.plays)
        except Exception:  # consumer not started yet
            return []

    async def update_lag(self) -> None:
        try:
            consumer = self.app.consumer
            assigned = [tp for tp in consumer.assignment() if tp.topic == self.topics.plays]
            lags = {
                tp.partition: max(0, (consumer.highwater(tp) or 0) - (consumer._committed_offset.get(tp) or 0))
                for tp in assigned
            }
            self.metrics.lag.set(sum(lags.values()))
            gauge = self.metrics.partition_lag
            for partition in self._lag_partitions - lags.keys():  # revoked since the last update
                gauge.remove(str(partition))
            for partition, lag in lags.items():
                gauge.labels(str(partition)).set(lag)
            self._lag_partitions = set(lags)
        except Exception:  # metrics must never break the worker
            log.debug("lag update failed", exc_info=True)


def trim_counts(counts: dict[str, int], keep: int) -> list[str]:
    """Drop all but the `keep` most-played tracks of `counts` in place (ties: the smaller track id stays);
    returns the dropped tracks."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    dropped = [track for track, _ in ranked[keep:]]
    for track in dropped:
        del counts[track]
    return dropped


def servable_tracks(live: LiveModel, vectors: Mapping[str, tuple[np.ndarray, str | None]]) -> dict[str, np.ndarray]:
    """The folded-in track vectors `live` can serve: solved against its own model version (a vector of
    another model lives in another latent basis; the track's owner re-solves it from its listeners' new
    vectors after a swap) and not known to the model itself."""
    return {
        t: v
        for t, (v, version) in vectors.items()
        if version == live.version and t not in live.item_index and len(v) == live.k
    }


def fresh_plays(plays: list[tuple], applied: int) -> list[tuple]:
    """The plays `(offset, track, ms_played, event_id)` of one user still to count, each record once: offsets above
    `applied` (the user's last applied offset: a batch re-delivered after a crash is skipped) and above
    every earlier kept one (a record fetched twice, e.g. after a seek, since faust's read offset lets the
    last delivered record through again, can sit twice in one batch)."""
    fresh, last = [], applied
    for play in plays:
        if play[0] > last:
            fresh.append(play)
            last = play[0]
    return fresh


class _Pending:
    """A user counted since the last fold-in started: state stamp (`UserState.stamp`) before, streams
    added per track, partition."""

    __slots__ = ("added", "before", "partition")

    def __init__(self, before: int, added: dict[str, int], partition: int) -> None:
        self.before = before
        self.added = added
        self.partition = partition


class _FullCounts(Mapping):
    """{user: full counts}, computed only for the users whose fold-in is rebuilt from all their counts."""

    def __init__(self, live: LiveModel, states: dict[str, UserState]) -> None:
        self.live = live
        self.states = states
        self._done: dict[str, dict[str, float]] = {}

    def __getitem__(self, user: str) -> dict[str, float]:
        if user not in self._done:
            self._done[user] = self.live.full_counts(user, self.states[user].counts)
        return self._done[user]

    def __iter__(self):
        return iter(self.states)

    def __len__(self) -> int:
        return len(self.states)
