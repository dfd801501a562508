"""Plays produced to the wrong partition are forwarded to their user's partition, as Kafka Streams
repartitions: most non-Java clients do not partition keyed records with murmur2 (librdkafka, so
confluent-kafka and the Go/.NET/Node clients built on it, hashes with CRC32; sarama uses FNV-1a;
kafka-go and keyless producers spread records round-robin).

A worker that reads such a record from `plays` partition q re-sends its bytes, keyed by the user, to
partition murmur2(user) of `plays.repartition` with a header naming where it came from
(`playrec-source: "q:offset"`). The worker that owns the user reads that partition (co-partitioned
with `plays` and the tables) and applies each forwarded play once: the user's row keeps, per source
partition, the offset of the last play applied from it (`UserState.sources`). Forwarding is
at-least-once (the source batch is committed only after faust's commit flushes the forwarded records)
and order-preserving per (source partition, user) (one producer, one in-flight batch per partition),
so a forwarder that crashes re-sends a suffix the owner skips: counting stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence

#: Header a forwarded play carries: b"<source partition>:<source offset>" of the original record.
SOURCE_HEADER = "playrec-source"


def source_header(partition: int, offset: int) -> tuple[str, bytes]:
    """The header of a play forwarded from `plays` partition `partition`, offset `offset`."""
    return SOURCE_HEADER, f"{partition}:{offset}".encode()


def read_source(headers: Sequence[tuple[str, bytes]] | None, partitions: int) -> tuple[int, int] | str:
    """`(source partition, source offset)` of a forwarded play, or the reason it is not one."""
    for name, value in headers or ():
        if name != SOURCE_HEADER:
            continue
        try:
            text = bytes(value).decode("ascii")
            partition_text, offset_text = text.split(":")
            partition, offset = int(partition_text), int(offset_text)
        except (TypeError, ValueError, UnicodeDecodeError):
            return f"forwarded play with a malformed {SOURCE_HEADER} header {bytes(value or b'')[:40]!r}"
        if not 0 <= partition < partitions or offset < 0:
            return f"forwarded play from partition {partition} offset {offset}: outside 0..{partitions - 1} / >= 0"
        return partition, offset
    return f"record on the repartition topic without a {SOURCE_HEADER} header: only workers produce there"
