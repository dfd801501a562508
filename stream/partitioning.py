"""Kafka's default partitioner for keyed records (murmur2, as the Java client and kafka-python use)."""

from __future__ import annotations

from kafka.partitioner.default import murmur2


class KeyPartitioner:
    """`partition = (murmur2(key) & 0x7fffffff) % partitions`, memoised per key (user ids repeat)."""

    def __init__(self, partitions: int, cache_size: int = 1 << 18) -> None:
        self.partitions = partitions
        self.cache_size = cache_size
        self._cache: dict[bytes, int] = {}

    def __call__(self, key: bytes | None) -> int | None:
        if key is None:
            return None
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            found = self._cache[key] = (murmur2(key) & 0x7FFFFFFF) % self.partitions
        return found
