"""Duplicate detection on image hashes: exact (sha256 of the bytes) and near (perceptual-hash Hamming distance).

Near duplicates are found with the pigeonhole trick: split the 64-bit hash into `threshold + 1` bands; two
hashes within `threshold` bits agree exactly on at least one band, so only hashes sharing a band are compared.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence


def _bands(threshold: int) -> list[tuple[int, int]]:
    """(shift, mask) per band, covering 64 bits in threshold + 1 nearly equal parts."""
    n = threshold + 1
    widths = [64 // n + (1 if i < 64 % n else 0) for i in range(n)]
    out, shift = [], 0
    for w in widths:
        out.append((shift, (1 << w) - 1))
        shift += w
    return out


def find_duplicates(sha256: Sequence[str | None], phash: Sequence[str | None], threshold: int) -> list[int | None]:
    """For each item, the index of the earlier item it duplicates (exactly or within `threshold` bits of
    perceptual hash), else None. Items with no hashes (failed samples) are skipped. A duplicate always points
    at a canonical (non-duplicate) item, so chains collapse to their first occurrence."""
    bands = _bands(threshold)
    by_sha: dict[str, int] = {}
    buckets: list[dict[int, list[int]]] = [defaultdict(list) for _ in bands]
    hashes: dict[int, int] = {}
    result: list[int | None] = [None] * len(sha256)
    for i, (sha, ph) in enumerate(zip(sha256, phash, strict=True)):
        if not sha:
            continue
        if sha in by_sha:
            result[i] = by_sha[sha]
            continue
        if ph:
            value = int(ph, 16)
            best = None
            for (shift, mask), bucket in zip(bands, buckets, strict=True):
                for j in bucket.get((value >> shift) & mask, ()):
                    if (best is None or j < best) and (value ^ hashes[j]).bit_count() <= threshold:
                        best = j
            if best is not None:
                result[i] = best
                by_sha[sha] = best
                continue
            hashes[i] = value
            for (shift, mask), bucket in zip(bands, buckets, strict=True):
                bucket[(value >> shift) & mask].append(i)
        by_sha[sha] = i
    return result
