"""A record whose delivery a rebalance cancels (stream.ingest.BatchingConsumerMixin._deliver).

The queue, its flow control and `wait_first` are mode's real ones; the consumer is the smallest
`BatchingConsumerMixin` + `mode.Service` whose `callback` awaits a put on a flow-controlled queue (faust's
conductor itself puts with `put_nowait` or awaits full-queue puts with `asyncio.wait`) and `suspend_flow`.
"""

from __future__ import annotations

import asyncio

from mode import Service
from mode.utils.queues import FlowControlEvent, ThrowableQueue

from stream.ingest import BatchingConsumerMixin


class _Consumer(BatchingConsumerMixin, Service):
    def __init__(self, queue: ThrowableQueue) -> None:
        super().__init__()
        self.queue = queue
        self.suspend_flow = asyncio.Event()

    async def callback(self, message: object) -> None:  # faust: conductor -> changelog queue put
        await self.queue.put(message)


class _Record:
    topic, partition, offset = "app-user-state-changelog", 3, 41


async def _blocked_delivery_then_rebalance() -> tuple[asyncio.Task, _Consumer]:
    flow = FlowControlEvent()
    flow.resume()
    queue = ThrowableQueue(maxsize=1, flow_control=flow, clear_on_resume=True)
    await queue.put("an earlier record")  # full: recovery applies slower than it fetches
    consumer = _Consumer(queue)
    delivery = asyncio.ensure_future(consumer._deliver(_Record()))
    await asyncio.sleep(0.01)  # let the delivery block on the full queue (the state under test)
    assert not delivery.done()
    # faust App._on_partitions_revoked, synchronously: consumer.stop_flow(); flow_control.suspend(); clear()
    consumer.suspend_flow.set()
    flow.suspend()
    flow.clear()  # cancels the blocked putter
    return delivery, consumer


def test_a_put_cancelled_by_a_rebalance_is_not_delivered_and_does_not_end_the_drain_loop() -> None:
    async def run() -> bool:
        delivery, _ = await _blocked_delivery_then_rebalance()
        return await delivery  # a bare wait_first re-raised the put's CancelledError here

    assert asyncio.run(run()) is False


def test_a_delivered_record_is_reported_delivered() -> None:
    async def run() -> bool:
        flow = FlowControlEvent()
        flow.resume()
        consumer = _Consumer(ThrowableQueue(maxsize=2, flow_control=flow))
        return await consumer._deliver(_Record())

    assert asyncio.run(run()) is True


def test_cancelling_the_drain_loop_itself_still_cancels_it() -> None:
    async def run() -> bool:
        delivery, _ = await _blocked_delivery_then_rebalance()
        delivery.cancel()
        try:
            await delivery
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(run())
