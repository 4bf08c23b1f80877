"""SemDeDup on synthetic embeddings: planted near-duplicates are found, distinct samples kept, deterministic."""

from __future__ import annotations

import numpy as np

from tasks.semdedup import kmeans, semdedup


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def planted(seed: int = 0, n: int = 200, dim: int = 64, copies: int = 30) -> tuple[list[str], np.ndarray, dict]:
    """n distinct random directions, then `copies` near-copies (cosine > 0.995) of some of them."""
    rng = np.random.default_rng(seed)
    base = unit(rng.normal(size=(n, dim)))
    sources = rng.choice(n, size=copies, replace=False)
    near = unit(base[sources] + 0.005 * rng.normal(size=(copies, dim)))
    keys = [f"k{i:04d}" for i in range(n)] + [f"z{i:04d}" for i in range(copies)]  # copies sort after originals
    truth = {f"z{j:04d}": f"k{s:04d}" for j, s in enumerate(sources)}
    return keys, np.concatenate([base, near]), truth


def test_planted_near_duplicates_are_found_and_distinct_samples_kept():
    keys, x, truth = planted()
    out = semdedup(keys, x, clusters=8, eps=0.02, seed=0)
    got = {k: d for k, d in zip(out.column("key").to_pylist(), out.column("semdedup_duplicate_of").to_pylist(),
                                strict=True) if d}
    # Random 64-d directions are far apart (|cos| < 0.6), so only the planted copies are duplicates, each of the
    # original it was made from (the original comes first in key order and is kept). A copy whose original fell
    # into another cluster cannot be found inside its own cluster: k-means puts near-copies together.
    assert got == truth
    assert out.num_rows == len(keys) and out.column("key").to_pylist() == sorted(keys)
    clusters = dict(zip(out.column("key").to_pylist(), out.column("semdedup_cluster").to_pylist(), strict=True))
    assert all(clusters[c] == clusters[o] for c, o in truth.items())


def test_deterministic_and_independent_of_input_order():
    keys, x, _ = planted(seed=1)
    a = semdedup(keys, x, clusters=6, eps=0.02, seed=3)
    assert a.equals(semdedup(keys, x, clusters=6, eps=0.02, seed=3))
    perm = np.random.default_rng(5).permutation(len(keys))
    b = semdedup([keys[i] for i in perm], x[perm], clusters=6, eps=0.02, seed=3)
    assert b.column("semdedup_duplicate_of").equals(a.column("semdedup_duplicate_of"))


def test_exact_copies_keep_the_first_key_and_a_larger_eps_merges_more():
    rng = np.random.default_rng(2)
    a, b = unit(rng.normal(size=(2, 16)))
    close = unit(a + 0.3 * unit(rng.normal(size=16)))  # cosine with a about 0.95
    x = np.stack([b, a, a, close])
    keys = ["d", "c", "b", "a"]  # key order: a (close), b (a), c (a), d (b)
    strict = semdedup(keys, x, clusters=1, eps=1e-4)
    assert dict(zip(strict.column("key").to_pylist(), strict.column("semdedup_duplicate_of").to_pylist(),
                    strict=True)) == {"a": None, "b": None, "c": "b", "d": None}
    cos = float(close @ a)
    loose = semdedup(keys, x, clusters=1, eps=1 - cos + 0.01)
    assert loose.column("semdedup_duplicate_of").to_pylist() == [None, "a", "a", None]


def test_kmeans_separates_clear_clusters_and_handles_small_inputs():
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(3, 8)))
    x = unit(np.repeat(centres, 20, axis=0) + 0.05 * rng.normal(size=(60, 8)))
    labels = kmeans(x, 3, seed=0)
    assert all(len(set(labels[i * 20:(i + 1) * 20])) == 1 for i in range(3)) and len(set(labels)) == 3
    assert kmeans(x[:2], 5).tolist() in ([0, 1], [1, 0])  # k capped at n
    assert semdedup([], np.zeros((0, 8))).num_rows == 0
