"""Semantic deduplication (SemDeDup, Abbas et al. 2023) on L2-normalised CLIP image embeddings.

k-means (spherical: cosine similarity, k-means++ seeding from a fixed seed) splits the embeddings into clusters;
inside each cluster, samples are visited in key order and one whose cosine similarity to an already kept sample
exceeds 1 - eps is marked a duplicate of the most similar kept one. The result only depends on the embeddings, the
keys and the settings, never on the shard order or on timing.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra.store import StoreError

SEMDEDUP_KEY = "{dataset}/score/_semdedup.parquet"  # beside the score stage's shards
SEMDEDUP_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("semdedup_cluster", pa.int32()),
    ("semdedup_duplicate_of", pa.string()),  # null: kept
])
BLOCK = 4096  # rows per k-means assignment block (bounds memory to BLOCK x k)


def default_clusters(n: int) -> int:
    return max(1, min(n, round(math.sqrt(n))))


def kmeans(x: np.ndarray, k: int, seed: int = 0, iterations: int = 30) -> np.ndarray:
    """Cluster id per row of `x` ([n, d], unit rows) by spherical k-means; deterministic for a given seed."""
    n = len(x)
    k = min(k, n)
    rng = np.random.default_rng(seed)
    centroids = np.empty((k, x.shape[1]), dtype=np.float32)
    centroids[0] = x[rng.integers(n)]
    dist = 1.0 - x @ centroids[0]
    for i in range(1, k):  # k-means++: the next seed far from the chosen ones
        weights = np.clip(dist, 0, None)
        total = float(weights.sum())
        pick = int(rng.choice(n, p=weights / total)) if total > 0 else int(rng.integers(n))
        centroids[i] = x[pick]
        dist = np.minimum(dist, 1.0 - x @ centroids[i])
    labels = np.full(n, -1, dtype=np.int64)
    for _ in range(iterations):
        new = np.concatenate([np.argmax(x[s:s + BLOCK] @ centroids.T, axis=1) for s in range(0, n, BLOCK)])
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = x[labels == c]
            if len(members):
                mean = members.sum(axis=0)
                centroids[c] = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return labels


def semdedup(keys: list[str], embeddings: np.ndarray, clusters: int | None = None, eps: float = 0.05,
             seed: int = 0, iterations: int = 30) -> pa.Table:
    """SEMDEDUP_SCHEMA rows, one per key, in key order."""
    if len(keys) == 0:
        return SEMDEDUP_SCHEMA.empty_table()
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    keys = [keys[i] for i in order]
    x = np.asarray(embeddings, dtype=np.float32)[order]
    labels = kmeans(x, clusters or default_clusters(len(keys)), seed, iterations)
    duplicate_of: list[str | None] = [None] * len(keys)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)  # ascending: key order
        kept: list[int] = []
        for i in members:
            if kept:
                sims = x[kept] @ x[i]
                best = int(np.argmax(sims))
                if sims[best] > 1.0 - eps:
                    duplicate_of[i] = keys[kept[best]]
                    continue
            kept.append(int(i))
    return pa.table({"key": keys, "semdedup_cluster": labels.astype(np.int32), "semdedup_duplicate_of":
                     pa.array(duplicate_of, pa.string())}, schema=SEMDEDUP_SCHEMA)


def semdedup_dataset(store, dataset: str, model_id: str, shards: list[int], clusters: int | None, eps: float,
                     seed: int, iterations: int) -> dict:
    """Read the dataset's image embeddings of `model_id` (samples scored ok only), run SemDeDup, write
    `<dataset>/score/_semdedup.parquet`. Returns counts."""
    from tasks.shards import stage_key

    keys: list[str] = []
    vectors: list[np.ndarray] = []
    for shard in shards:
        try:
            emb = store.get_parquet(stage_key(dataset, "embeddings", shard, "parquet"))
            ok = store.get_parquet(stage_key(dataset, "score", shard, "parquet"), columns=["key", "status"])
        except StoreError:
            continue
        scored = {k for k, s in zip(ok.column("key").to_pylist(), ok.column("status").to_pylist(), strict=True)
                  if s == "ok"}
        for row in emb.filter(pc.equal(emb.column("model"), model_id)).to_pylist():
            if row["key"] in scored:
                keys.append(row["key"])
                vectors.append(np.asarray(row["embedding"], dtype=np.float32))
    x = np.stack(vectors) if vectors else np.zeros((0, 1), dtype=np.float32)
    table = semdedup(keys, x, clusters, eps, seed, iterations)
    store.put_parquet(SEMDEDUP_KEY.format(dataset=dataset), table)
    kept = table.column("semdedup_duplicate_of").null_count
    return {"samples": table.num_rows, "duplicates": table.num_rows - kept,
            "clusters": len(set(table.column("semdedup_cluster").to_pylist())), "model": model_id, "eps": eps}
