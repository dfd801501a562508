"""Prometheus metrics of a stream worker (served at GET /metrics)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: A background fold-in solves every user counted since the previous one: after a restart, a swap's
#: re-fold or a restore from the source topics it takes longer than a request.
FOLD_IN_BUCKETS = (*LATENCY_BUCKETS, 10.0, 30.0, 60.0, 120.0)


class WorkerMetrics:
    """One registry per worker, so several workers in one process (tests) do not mix figures."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.events = Counter("playrec_events_processed", "Valid play events applied to the counts", registry=r)
        self.duplicates = Counter(
            "playrec_duplicate_events",
            "Plays skipped because their event_id repeats one of the user's latest applied plays",
            registry=r,
        )
        self.forwarded = Counter(
            "playrec_plays_forwarded",
            "Plays produced to another partition than their user's, forwarded to plays.repartition",
            registry=r,
        )
        self.tracks_trimmed = Counter(
            "playrec_user_tracks_trimmed",
            "Tracks dropped from users' rows past the per-user bound (least-played first)",
            registry=r,
        )
        self.streams = Counter("playrec_streams_counted", "Plays that counted as streams (>= 30 s)", registry=r)
        self.dead_letters = Counter(
            "playrec_dead_letters", "Invalid events sent to the dead-letter topic", ["kind"], registry=r
        )
        self.user_fold_ins = Counter("playrec_user_fold_ins", "User vectors solved by fold-in", registry=r)
        self.track_fold_ins = Counter("playrec_track_fold_ins", "New-track vectors solved by fold-in", registry=r)
        self.batch_seconds = Histogram(
            "playrec_batch_seconds",
            "Time to process one micro-batch of play events",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fold_in_seconds = Histogram(
            "playrec_fold_in_seconds",
            "Time of one background fold-in: solve and write the users counted since the previous one",
            buckets=FOLD_IN_BUCKETS,
            registry=r,
        )
        self.batch_events = Histogram(
            "playrec_batch_events",
            "Events per micro-batch",
            buckets=(1, 10, 100, 1000, 5000, 10000, 20000, 50000),
            registry=r,
        )
        self.request_seconds = Histogram(
            "playrec_request_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.lag = Gauge("playrec_consumer_lag", "Play events behind the end of the assigned partitions", registry=r)
        self.partition_lag = Gauge(
            "playrec_consumer_partition_lag",
            "Play events behind the end of one assigned partition of plays (its committed offset to its end)",
            ["partition"],
            registry=r,
        )
        self.model_loads = Counter("playrec_model_loads", "Model versions loaded (start-up and hot swaps)", registry=r)
        self.new_tracks = Gauge("playrec_new_tracks", "Tracks folded in since the model was loaded", registry=r)
        self.restored = Gauge(
            "playrec_changelog_records_restored",
            "Changelog records applied to the local tables by recovery since start-up",
            ["table"],
            registry=r,
        )
        self.dropped = Gauge(
            "playrec_local_partitions_dropped",
            "Table partitions whose local store was dropped (not backed by the changelog) since start-up",
            ["table"],
            registry=r,
        )

    def watch_source_replay(self, replay: Any) -> None:
        """Report a `stream.source_replay.SourceReplay`'s partitions being restored and restored."""
        r = self.registry
        restoring = Gauge(
            "playrec_partitions_restoring_from_source",
            "User-state partitions whose lost changelog records are being read again from plays",
            registry=r,
        )
        restoring.set_function(lambda: len(replay.active))
        restored = Gauge(
            "playrec_partitions_restored_from_source",
            "User-state partitions restored from plays since start-up (their changelog had lost records)",
            registry=r,
        )
        restored.set_function(lambda: replay.completed)
        gone = Gauge(
            "playrec_source_plays_unrecoverable",
            "Plays deleted from the source topics before a restore could read them again (counts lost)",
            registry=r,
        )
        gone.set_function(lambda: replay.unrecoverable)

    def watch_table(self, table: Any) -> None:
        """Report a `stream.table_store.StateTable`'s restored records and dropped partitions."""
        self.restored.labels(table.name).set_function(lambda: table.restored)
        self.dropped.labels(table.name).set_function(lambda: table.wiped)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def dead_letter_kind(reason: str) -> str:
    """A small, fixed label set for dead-letter reasons (the full reason travels in a header)."""
    lowered = reason.lower()
    for kind in ("forwarded", "undecodable", "payload", "missing", "key", "timestamp"):
        if kind in lowered:
            return kind
    if "field" in lowered:
        return "field"
    if "ms_played" in lowered:
        return "duration"
    return "other"
