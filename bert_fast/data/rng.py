"""The integer RNG shared by the C++ sample builder (csrc/data/rng.h) and the Python reference.

A splitmix64 stream (Steele, Lea, Flood: "Fast splittable pseudorandom number generators", 2014)
keyed by (seed, epoch, index, domain): every document (when planning samples) and every sample
(when masking) has its own stream, so the output does not depend on thread count, rank layout or
the order in which samples are built. Draws are integers or exact dyadic floats, so Python and C++
agree bit for bit.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
DOMAIN_PLAN = 0x504C414E  # "PLAN": choosing segments of a document
DOMAIN_MASK = 0x4D41534B  # "MASK": choosing masked positions of a sample
DOMAIN_SHARD = 0x53485244  # "SHRD": a shard's planning seed (Python only, see dataset.py)


def mix64(z: int) -> int:
    """splitmix64's output function (a bijection on 64-bit integers)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, epoch: int, index: int, domain: int) -> int:
    h = mix64((seed ^ domain) & MASK64)
    h = mix64((h ^ epoch) & MASK64)
    return mix64((h ^ index) & MASK64)


class Rng:
    """A splitmix64 stream starting at `stream_key(seed, epoch, index, domain)`."""

    def __init__(self, seed: int, epoch: int, index: int, domain: int):
        self.state = stream_key(seed, epoch, index, domain)

    def next_u64(self) -> int:
        self.state = (self.state + GOLDEN) & MASK64
        return mix64(self.state)

    def below(self, n: int) -> int:
        """Uniform in [0, n) by multiply-high (Lemire), without modulo."""
        return (self.next_u64() * n) >> 64

    def randint(self, low: int, high: int) -> int:
        """Uniform in [low, high], both ends included (Python's random.randint)."""
        return low + self.below(high - low + 1)

    def random(self) -> float:
        """Uniform in [0, 1) with 53 random bits."""
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))
