"""Exact and near-duplicate detection, and a brute-force cross-check of the pigeonhole band search."""

from __future__ import annotations

import random

import pytest

from tasks.dedup import _bands, find_duplicates


def h(value: int) -> str:
    return f"{value:016x}"


def flip(value: int, *bits: int) -> int:
    for b in bits:
        value ^= 1 << b
    return value


BASE = 0x0123456789ABCDEF


def test_no_duplicates() -> None:
    assert find_duplicates(["a", "b", "c"], [h(0), h(0xFFFF_FFFF_FFFF_FFFF), h(0xFFFF_0000_FFFF_0000)], 4) == \
        [None, None, None]
    assert find_duplicates([], [], 4) == []


def test_exact_duplicates() -> None:
    sha = ["s1", "s2", "s1", "s1", "s2"]
    # Exact duplicates are found by sha256 even if their phash differs (or is missing).
    ph = [h(0), h(0xFFFF_FFFF_FFFF_FFFF), h(0x0F0F_0F0F_0F0F_0F0F), None, h(0)]
    assert find_duplicates(sha, ph, 4) == [None, None, 0, 0, 1]


def test_exact_duplicates_without_phash() -> None:
    assert find_duplicates(["x", "y", "x"], [None, None, None], 4) == [None, None, 0]


def test_near_duplicates_within_threshold() -> None:
    ph = [h(BASE), h(flip(BASE, 0)), h(flip(BASE, 0, 17, 33, 63)), h(flip(BASE, 1, 2, 3, 4, 5))]
    assert find_duplicates(["a", "b", "c", "d"], ph, 4) == [None, 0, 0, None]


def test_not_beyond_threshold() -> None:
    ph = [h(BASE), h(flip(BASE, 0, 1, 2, 3, 4))]
    assert find_duplicates(["a", "b"], ph, 4) == [None, None]
    assert find_duplicates(["a", "b"], ph, 5) == [None, 0]


def test_bits_spread_over_every_band() -> None:
    # One flipped bit in each of the first `threshold` bands: still a near duplicate.
    for threshold in range(1, 17):
        bands = _bands(threshold)
        bits = [shift for shift, _ in bands[:threshold]]
        ph = [h(BASE), h(flip(BASE, *bits))]
        assert find_duplicates(["a", "b"], ph, threshold) == [None, 0], threshold
        # One more bit (in the last band) is too far.
        ph = [h(BASE), h(flip(BASE, *bits, bands[-1][0]))]
        assert find_duplicates(["a", "b"], ph, threshold) == [None, None], threshold


def test_bands_cover_64_bits() -> None:
    for threshold in range(17):
        bands = _bands(threshold)
        assert len(bands) == threshold + 1
        covered = 0
        for shift, mask in bands:
            assert covered & (mask << shift) == 0
            covered |= mask << shift
        assert covered == (1 << 64) - 1


def test_chains_collapse_to_first_canonical() -> None:
    # b is within 2 of a, c within 2 of b but 4 from a: c is not a duplicate of a, and never points at b.
    a, b, c = BASE, flip(BASE, 0, 1), flip(BASE, 0, 1, 2, 3)
    assert find_duplicates(["a", "b", "c"], [h(a), h(b), h(c)], 2) == [None, 0, None]
    # With threshold 4 all point at a; an exact copy of b points at b's canonical (a), not at b.
    assert find_duplicates(["a", "b", "c", "b"], [h(a), h(b), h(c), h(b)], 4) == [None, 0, 0, 0]


def test_earliest_canonical_wins() -> None:
    a, b = BASE, flip(BASE, 10, 11, 12, 13, 14, 15)  # 6 apart: both canonical at threshold 3
    x = flip(BASE, 10, 11, 12)  # 3 from each
    assert find_duplicates(["a", "b", "x"], [h(a), h(b), h(x)], 3) == [None, None, 0]
    assert find_duplicates(["b", "a", "x"], [h(b), h(a), h(x)], 3) == [None, None, 0]


def test_none_entries_skipped() -> None:
    sha = [None, "a", None, "b", "", "c"]
    ph = [h(BASE), h(BASE), h(BASE), h(flip(BASE, 0)), h(BASE), None]
    # Failed samples (no sha) are never duplicates nor canonicals; a sample with no phash is only exact-matched.
    assert find_duplicates(sha, ph, 4) == [None, None, None, 1, None, None]
    assert find_duplicates([None, None], [None, None], 0) == [None, None]


def test_threshold_zero() -> None:
    ph = [h(BASE), h(flip(BASE, 5)), h(BASE), h(BASE)]
    assert find_duplicates(["a", "b", "c", "a"], ph, 0) == [None, None, 0, 0]


def test_hash_spelling() -> None:
    # Upper-case hex and short (unpadded) hashes are read as numbers.
    assert find_duplicates(["a", "b"], ["00000000000000ff", "FF"], 0) == [None, 0]


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError):
        find_duplicates(["a", "b"], [h(0)], 4)


def naive(sha: list[str | None], ph: list[str | None], threshold: int) -> list[int | None]:
    """O(n²) reference: exact copies point where the first copy points (or at it); otherwise the earliest
    canonical item within `threshold` bits; otherwise the item is canonical."""
    result: list[int | None] = [None] * len(sha)
    canonical: list[int] = []
    first_with_sha: dict[str, int] = {}
    for i in range(len(sha)):
        if not sha[i]:
            continue
        if sha[i] in first_with_sha:
            j = first_with_sha[sha[i]]
            result[i] = j if result[j] is None else result[j]
            continue
        first_with_sha[sha[i]] = i
        if ph[i] is None:
            continue
        v = int(ph[i], 16)
        match = next((j for j in canonical if ph[j] is not None and (int(ph[j], 16) ^ v).bit_count() <= threshold),
                     None)
        if match is None:
            canonical.append(i)
        else:
            result[i] = match
    return result


@pytest.mark.parametrize("threshold", [0, 1, 3, 4, 8, 12, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_brute_force(seed: int, threshold: int) -> None:
    rng = random.Random(seed * 100 + threshold)
    n = 600
    centers = [rng.getrandbits(64) for _ in range(40)]
    sha: list[str | None] = []
    ph: list[str | None] = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.05:
            sha.append(None)
            ph.append(None)
            continue
        if roll < 0.15 and sha:
            k = rng.randrange(len(sha))  # an exact copy of an earlier item
            sha.append(sha[k])
            ph.append(ph[k])
            continue
        sha.append(f"sha{i}")
        if roll < 0.20:
            ph.append(None)
        elif roll < 0.40:
            ph.append(h(rng.getrandbits(64)))
        else:
            # near a cluster centre: distances straddle the threshold
            bits = rng.sample(range(64), rng.randint(0, threshold + 3))
            ph.append(h(flip(rng.choice(centers), *bits)))
    got = find_duplicates(sha, ph, threshold)
    assert got == naive(sha, ph, threshold)
    # Sanity: the fixture actually exercises near duplicates (except where none can exist).
    if threshold:
        assert sum(1 for i, j in enumerate(got) if j is not None and sha[i] != sha[j]) > 10
    # Every duplicate points at an earlier canonical item.
    for i, j in enumerate(got):
        if j is not None:
            assert j < i and got[j] is None
