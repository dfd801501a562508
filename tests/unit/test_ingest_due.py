"""When a BatchIngest buffer is flushed (stream.ingest.BatchIngest.due / remaining_s)."""

from __future__ import annotations

from types import SimpleNamespace

from stream.ingest import READY_POLL_S, BatchIngest


def sink(buffered: int, first_at: float, ready: bool | None) -> SimpleNamespace:
    return SimpleNamespace(
        buffer=[object()] * buffered,
        first_at=first_at,
        max_batch=10,
        max_latency_s=0.02,
        ready=None if ready is None else (lambda: ready),
    )


def due(s: SimpleNamespace, now: float) -> bool:
    return BatchIngest.due(s, now)  # type: ignore[arg-type]


def remaining(s: SimpleNamespace, now: float) -> float:
    return BatchIngest.remaining_s(s, now)  # type: ignore[arg-type]


def test_a_full_buffer_is_due_even_while_the_handler_is_busy() -> None:
    assert due(sink(10, 100.0, ready=False), 100.0)


def test_an_old_enough_buffer_waits_for_a_busy_handler() -> None:
    assert not due(sink(3, 100.0, ready=False), 100.5)  # keeps growing while the handler works
    assert due(sink(3, 100.0, ready=True), 100.5)
    assert due(sink(3, 100.0, ready=None), 100.5)  # no ready(): max_latency alone decides
    assert not due(sink(3, 100.0, ready=True), 100.01)
    assert not due(sink(0, 100.0, ready=True), 200.0)


def test_the_fetch_timeout_polls_a_busy_handler() -> None:
    assert remaining(sink(0, 0.0, ready=True), 5.0) == 1.0
    assert abs(remaining(sink(3, 100.0, ready=True), 100.005) - 0.015) < 1e-9
    assert remaining(sink(3, 100.0, ready=False), 100.5) == READY_POLL_S
