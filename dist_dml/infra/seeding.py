"""One seed-mixing function for every deterministic stream (sampler draws, shard order, batches)."""
from __future__ import annotations


def mix(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 rounds): neighbouring inputs give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
