"""Cross-modal retrieval metrics: pure functions of two feature matrices (or of the ranks they give).

Conventions, the same everywhere in genealign:

- Row i of `query` and row i of `gallery` are the same subject (the true pair).
- The score of a pair is the dot product of its features. Model and baseline features are
  L2-normalised, so it is their cosine similarity; the oracle's features are built so that the dot
  product is its log-likelihood-type score.
- Direction neuro->gene: query = neuro features, gallery = the gene features of the pool;
  gene->neuro the reverse.
- Rank of the true pair = 1 + the number of *other* gallery items scoring >= it. Ties count against
  the method (pessimistic), so a scorer that gives every pair the same score ranks every true pair
  last, never first.
- Ranks are computed a block of queries at a time against the whole gallery, taking the true pair's
  score from the same block (bit-identical to the scores it is compared with) and counting >=.
  Memory is O(chunk x N), never N x N, so 100,000 subjects fit.
- Chance levels for a pool of n: top-k k/n, mean and median rank (n+1)/2, MRR H_n/n.

Uncertainty (see `method_metrics`):
- Random pools of a fixed size (the brain-decoding convention "top-1 out of 300"): mean over draws,
  95% interval = 2.5-97.5 percentiles over draws. The same draws (from the seed, the split size and
  the pool size) are used for every method, so methods are compared on identical pools.
- Whole split: bootstrap 95% percentile interval over *queries*, resampling the per-query ranks
  computed against the full, fixed gallery. Resampling subjects and re-ranking inside the resampled
  pool would put duplicate subjects in the gallery, and a duplicate of the true partner ties with it,
  so pessimistic ranking would punish every duplicated subject; bootstrapping the per-query rank
  indicators avoids that (it is conditional on the gallery; the pool draws show gallery variability).
  The same resample indices are used for every method (paired bootstrap).
- Permutation test of top-1 on the whole split: the gallery pairing is shuffled, top-1 recomputed;
  p = (1 + #{null top-1 >= observed}) / (1 + n_perm). Under a shuffle pi, query i is a hit iff pi(i)
  is the unique best-scoring gallery item of row i, so one ranking pass serves every permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import GenealignError

DIRECTIONS = ("neuro_to_gene", "gene_to_neuro")
RANK_METRICS = ("top1", "top5", "top10", "mean_rank", "median_rank", "mrr")
CI_LEVEL = 0.95
TOPK_MAX = 50
HIST_BINS = 20
# Elements of one (chunk x N) score block: 2**26 float32 = 256 MiB.
BLOCK_ELEMENTS = 1 << 26


def chunk_for(n: int, max_chunk: int = 2048) -> int:
    """Query rows per block so that a (chunk, n) score block stays around BLOCK_ELEMENTS."""
    return int(max(1, min(max_chunk, BLOCK_ELEMENTS // max(1, n))))


def _as_tensor(x) -> torch.Tensor:
    """A floating tensor without copying numpy input; half precision is widened to float32."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t


def _check_pair(query: torch.Tensor, gallery: torch.Tensor) -> None:
    if query.ndim != 2 or gallery.ndim != 2 or query.shape != gallery.shape:
        raise GenealignError(
            f"Retrieval needs query and gallery features of the same shape (N, d); got "
            f"{tuple(query.shape)} and {tuple(gallery.shape)}."
        )
    if query.shape[0] < 2:
        raise GenealignError(f"Retrieval needs at least 2 subjects in the pool; got {query.shape[0]}.")
    if not (torch.isfinite(query).all() and torch.isfinite(gallery).all()):
        raise GenealignError(
            "Features contain NaN or inf (a diverged checkpoint or non-finite inputs); retrieval "
            "cannot rank them. Check the training curves and the store's values."
        )


def _pair(query, gallery) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked tensors of one dtype on the query's device."""
    query, gallery = _as_tensor(query), _as_tensor(gallery)
    _check_pair(query, gallery)
    dtype = torch.promote_types(query.dtype, gallery.dtype)
    return query.to(dtype), gallery.to(query.device, dtype)


@dataclass
class RankPass:
    """Everything one chunked pass over the (N x N) scores of one direction yields."""

    ranks: np.ndarray  # (N,) int64, 1-based, pessimistic ties
    best: np.ndarray  # (N,) int64, index of the highest-scoring gallery item of each query
    best_unique: np.ndarray  # (N,) bool, the highest score occurs once in the row
    matched: np.ndarray  # (N,) float64, score of the true pair
    unmatched_mean: float  # over all N(N-1) non-matching pairs
    unmatched_sd: float
    unmatched_sample: np.ndarray  # (N,) float64, one random non-matching pair per query (for plots)


def _count_ge(scores: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per row of `scores` (..., N), how many entries are >= that row's `true` (...): the rank with
    pessimistic ties, since the true pair itself counts once. Overwrites `scores` with 1/0 (in place,
    then a float sum: several times faster than a bool tensor's integer sum; exact below 2**24)."""
    return scores.ge_(true.unsqueeze(-1)).sum(dim=-1)


def rank_pass(query, gallery, chunk: int = 2048, seed: int = 0) -> RankPass:
    """Ranks of the true pairs plus the row maxima and score moments, one block of queries at a time.

    Per block: one matmul into a reused buffer, one comparison, one top-2. The moments of all N(N-1)
    unmatched scores need no pass over the scores: sum_ij q_i.g_j = (sum_i q_i).(sum_j g_j) and
    sum_ij (q_i.g_j)^2 = <Q^T Q, G^T G>, both in float64, minus the matched (diagonal) terms."""
    query, gallery = _pair(query, gallery)
    n = query.shape[0]
    chunk = max(1, min(int(chunk), n))
    rng = np.random.default_rng([seed, n, 7])
    # A random other column per query: (i + offset) mod n with offset in [1, n-1].
    other = torch.from_numpy((np.arange(n) + rng.integers(1, n, size=n)) % n).to(query.device)
    scores_buf = torch.empty(chunk, n, dtype=query.dtype, device=query.device)  # reused: no page faults
    gallery_t = gallery.T
    ranks, best, unique, matched, sample = [], [], [], [], []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rows = torch.arange(stop - start, device=query.device)
        scores = torch.matmul(query[start:stop], gallery_t, out=scores_buf[: stop - start])  # (c, N)
        true = scores[rows, rows + start].clone()  # (c,)
        top2 = scores.topk(2, dim=1)
        best.append(top2.indices[:, 0])
        unique.append(top2.values[:, 0] > top2.values[:, 1])
        matched.append(true)
        sample.append(scores[rows, other[start:stop]])
        ranks.append(_count_ge(scores, true))
    cat = lambda parts: torch.cat(parts).cpu().numpy()  # noqa: E731
    matched_np = cat(matched).astype(np.float64)
    q64, g64 = query.double(), gallery.double()
    total = float(q64.sum(dim=0) @ g64.sum(dim=0)) - matched_np.sum()
    total_sq = float(((q64.T @ q64) * (g64.T @ g64)).sum()) - (matched_np**2).sum()
    pairs = n * (n - 1)
    mean = total / pairs
    var = max(0.0, (total_sq - pairs * mean**2) / max(1, pairs - 1))
    return RankPass(
        ranks=cat(ranks).astype(np.int64),
        best=cat(best).astype(np.int64),
        best_unique=cat(unique).astype(bool),
        matched=matched_np,
        unmatched_mean=float(mean),
        unmatched_sd=float(np.sqrt(var)),
        unmatched_sample=cat(sample).astype(np.float64),
    )


def retrieval_ranks(query, gallery, chunk: int = 2048) -> np.ndarray:
    """(N,) int64 1-based rank of gallery[i] among all gallery rows for query[i] (dot product,
    ties pessimistic). Computed in blocks of `chunk` queries; never materialises N x N."""
    query, gallery = _pair(query, gallery)
    n = query.shape[0]
    out = []
    for start in range(0, n, max(1, int(chunk))):
        stop = min(n, start + max(1, int(chunk)))
        rows = torch.arange(stop - start, device=query.device)
        scores = query[start:stop] @ gallery.T  # (c, N)
        out.append(_count_ge(scores, scores[rows, rows + start].clone()))
    return torch.cat(out).cpu().numpy().astype(np.int64)


def harmonic(n: int) -> float:
    """H_n = 1 + 1/2 + ... + 1/n."""
    return float(np.sum(1.0 / np.arange(1, int(n) + 1, dtype=np.float64)))


def chance_levels(pool_size: int) -> dict:
    """What a scorer that knows nothing gets, in expectation, on a pool of `pool_size`."""
    n = int(pool_size)
    return {
        "chance_top1": min(1, n) / n,
        "chance_top5": min(5, n) / n,
        "chance_top10": min(10, n) / n,
        "chance_mean_rank": (n + 1) / 2,
        "chance_median_rank": (n + 1) / 2,
        "chance_mrr": harmonic(n) / n,
    }


def summarize_ranks(ranks, pool_size: int) -> dict:
    """top-1/5/10 (fractions), mean and median rank, MRR of 1-based ranks, with the pool's chance."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return {
        "top1": float(np.mean(ranks <= 1)),
        "top5": float(np.mean(ranks <= 5)),
        "top10": float(np.mean(ranks <= 10)),
        "mean_rank": float(np.mean(ranks)),
        "median_rank": float(np.median(ranks)),
        "mrr": float(np.mean(1.0 / ranks)),
        "pool_size": int(pool_size),
        **chance_levels(pool_size),
    }


def topk_curve(ranks, k_max: int = TOPK_MAX) -> np.ndarray:
    """(k_max,) fraction of queries whose true pair is within the top k, for k = 1..k_max."""
    ranks = np.asarray(ranks)
    counts = np.bincount(np.minimum(ranks, k_max + 1), minlength=k_max + 2)[1 : k_max + 1]
    return np.cumsum(counts) / len(ranks)


def _percentile_interval(values: np.ndarray, level: float = CI_LEVEL) -> list[float]:
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return [float(lo), float(hi)]


def _rank_stats(ranks: np.ndarray) -> dict:
    """Each metric of RANK_METRICS for a (B, N) batch of rank vectors -> (B,) arrays."""
    ranks = ranks.astype(np.float64)
    return {
        "top1": (ranks <= 1).mean(axis=1),
        "top5": (ranks <= 5).mean(axis=1),
        "top10": (ranks <= 10).mean(axis=1),
        "mean_rank": ranks.mean(axis=1),
        "median_rank": np.median(ranks, axis=1),
        "mrr": (1.0 / ranks).mean(axis=1),
    }


def bootstrap_ci(ranks, n_boot: int = 1000, seed: int = 0, level: float = CI_LEVEL) -> dict:
    """Percentile interval of each rank metric over `n_boot` resamples (with replacement) of the
    queries' ranks against the fixed full gallery; {metric: [lo, hi]}. Resample indices depend only
    on (seed, N), so two methods on the same split get the same resamples."""
    ranks = np.asarray(ranks, dtype=np.int64)
    n = len(ranks)
    rng = np.random.default_rng([seed, n, 11])
    per_block = max(1, (1 << 24) // max(1, n))  # resamples per block: (block, N) int64 <= 128 MiB
    stats: dict[str, list] = {m: [] for m in RANK_METRICS}
    for start in range(0, n_boot, per_block):
        idx = rng.integers(0, n, size=(min(per_block, n_boot - start), n))
        for name, values in _rank_stats(ranks[idx]).items():
            stats[name].append(values)
    return {name: _percentile_interval(np.concatenate(v), level) for name, v in stats.items()}


def top1_permutation_test(best, best_unique, n_perm: int = 1000, seed: int = 0) -> dict:
    """Permutation test of top-1 from one ranking pass (`RankPass.best`, `.best_unique`).

    Shuffling the gallery pairing with pi makes query i a hit iff pi(i) is the unique argmax of its
    row. Returns observed top-1, p = (1 + #{null >= observed}) / (1 + n_perm), and the null's mean."""
    best = np.asarray(best, dtype=np.int64)
    best_unique = np.asarray(best_unique, dtype=bool)
    n = len(best)
    observed = float(np.mean((best == np.arange(n)) & best_unique))
    rng = np.random.default_rng([seed, n, 13])
    null = np.empty(n_perm, dtype=np.float64)
    for p in range(n_perm):
        null[p] = np.mean((best == rng.permutation(n)) & best_unique)
    # A small tolerance so a null value equal to the observed one (same count of hits) counts as >=.
    exceed = int(np.sum(null >= observed - 1e-12))
    return {
        "top1": observed,
        "p_value": (1 + exceed) / (1 + n_perm),
        "n_permutations": int(n_perm),
        "null_top1_mean": float(null.mean()) if n_perm else None,
    }


def holm_adjust(p_values) -> np.ndarray:
    """Holm's step-down adjustment of m p-values (family-wise error at level alpha: reject where the
    adjusted p <= alpha). The k-th smallest p (k = 1..m) becomes max over j <= k of (m - j + 1) p_(j),
    capped at 1; returned in the input order. A table of many permutation p-values (every model,
    baseline and direction) should be read through this, not one p at a time."""
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    m = len(p)
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = stepped
    return out


def pool_draws(n: int, pool_size: int, draws: int, seed: int = 0) -> np.ndarray:
    """(draws, pool_size) random subsets of range(n) without replacement; a function of
    (seed, n, pool_size) only, so every method is scored on the same pools."""
    rng = np.random.default_rng([seed, n, pool_size, 17])
    return np.stack([np.sort(rng.choice(n, size=pool_size, replace=False)) for _ in range(draws)])


def pooled_ranks(query, gallery, subsets: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """(draws, pool) ranks within each pool: several pools scored in one batched matmul while
    their (pool x pool) score blocks fit BLOCK_ELEMENTS; larger pools go through retrieval_ranks."""
    query, gallery = _pair(query, gallery)
    draws, pool = subsets.shape
    index = torch.from_numpy(np.ascontiguousarray(subsets)).to(query.device)
    per_group = BLOCK_ELEMENTS // (pool * pool)
    if per_group < 1:
        return np.stack([retrieval_ranks(query[i], gallery[i], chunk=chunk) for i in index])
    out = []
    for start in range(0, draws, per_group):
        rows = index[start : start + per_group]  # (b, pool)
        scores = torch.bmm(query[rows], gallery[rows].transpose(1, 2))  # (b, pool, pool)
        true = torch.diagonal(scores, dim1=1, dim2=2).clone()  # (b, pool)
        out.append(_count_ge(scores, true))
    return torch.cat(out).cpu().numpy().astype(np.int64)


def pooled_metrics(query, gallery, subsets: np.ndarray, chunk: int = 2048, level: float = CI_LEVEL) -> dict:
    """Rank metrics within each random pool (rows of `subsets`): mean over draws, interval =
    percentiles over draws, sd over draws, and the pool's chance levels."""
    pool_size = subsets.shape[1]
    stats = _rank_stats(pooled_ranks(query, gallery, subsets, chunk))
    out = {name: float(np.mean(v)) for name, v in stats.items()}
    out.update(pool_size=int(pool_size), n_draws=int(len(subsets)), **chance_levels(pool_size))
    out["ci"] = {name: _percentile_interval(v, level) for name, v in stats.items()}
    out["sd"] = {name: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for name, v in stats.items()}
    out["ci_method"] = f"{level:.0%} interval = 2.5-97.5 percentiles over {len(subsets)} random pools"
    return out


def similarity_summary(matched, unmatched_mean: float, unmatched_sd: float, n_unmatched: int) -> dict:
    """Matched vs unmatched pair scores: means, sds and Cohen's d.

    d = (mean_matched - mean_unmatched) / sqrt((sd_matched^2 + sd_unmatched^2) / 2): the average of
    the two variances, because the groups' sizes (N vs N(N-1)) differ so much that the usual
    size-weighted pooled sd would simply be the unmatched sd."""
    matched = np.asarray(matched, dtype=np.float64)
    m_mean = float(matched.mean())
    m_sd = float(matched.std(ddof=1)) if len(matched) > 1 else 0.0
    pooled = np.sqrt((m_sd**2 + unmatched_sd**2) / 2)
    return {
        "matched_mean": m_mean,
        "matched_sd": m_sd,
        "unmatched_mean": float(unmatched_mean),
        "unmatched_sd": float(unmatched_sd),
        "cohens_d": float((m_mean - unmatched_mean) / pooled) if pooled > 0 else 0.0,
        "n_matched": int(len(matched)),
        "n_unmatched": int(n_unmatched),
    }


def method_metrics(
    neuro_features,
    gene_features,
    *,
    pool_sizes=(),
    draws: int = 30,
    bootstrap: int = 1000,
    permutations: int = 1000,
    seed: int = 0,
    chunk: int | None = None,
    k_max: int = TOPK_MAX,
) -> tuple[dict, dict]:
    """Every retrieval figure of one method on one split, both directions.

    `pool_sizes`: random pool sizes, each < N (the whole split is always scored, under the key
    'all'). Returns (figures, plot_data): figures is JSON-ready; plot_data holds per-query arrays
    (ranks per direction, matched scores, a sample of unmatched scores) for the plots."""
    neuro, genes = _as_tensor(neuro_features), _as_tensor(gene_features)
    _check_pair(neuro, genes)
    n = neuro.shape[0]
    chunk = chunk or chunk_for(n)
    k_max = min(k_max, n)
    retrieval, curves, ranks_by_direction, similarity, samples = {}, {}, {}, None, None
    for direction, (query, gallery) in zip(DIRECTIONS, ((neuro, genes), (genes, neuro))):
        result = rank_pass(query, gallery, chunk=chunk, seed=seed)
        whole = summarize_ranks(result.ranks, n)
        whole["n_draws"] = 1
        if bootstrap > 0:
            whole["ci"] = bootstrap_ci(result.ranks, bootstrap, seed=seed)
            whole["ci_method"] = f"{CI_LEVEL:.0%} bootstrap percentile interval, {bootstrap} resamples of the queries"
        if permutations > 0:
            test = top1_permutation_test(result.best, result.best_unique, permutations, seed=seed)
            whole["p_value_top1"] = test["p_value"]
            whole["n_permutations"] = test["n_permutations"]
            whole["null_top1_mean"] = test["null_top1_mean"]
        by_pool = {}
        for size in sorted(int(s) for s in pool_sizes):
            by_pool[str(size)] = pooled_metrics(query, gallery, pool_draws(n, size, draws, seed), chunk=chunk_for(size))
        by_pool["all"] = whole
        retrieval[direction] = by_pool
        curves[direction] = topk_curve(result.ranks, k_max).tolist()
        ranks_by_direction[direction] = result.ranks
        if similarity is None:  # the score matrix of the other direction is its transpose
            similarity = similarity_summary(result.matched, result.unmatched_mean, result.unmatched_sd, n * (n - 1))
            samples = (result.matched, result.unmatched_sample)
    edges = np.unique(np.linspace(1, n + 1, min(HIST_BINS, n) + 1).round().astype(np.int64))
    histogram = {"bin_edges": edges.tolist()}  # bins [edges[i], edges[i+1]) of 1-based ranks
    for direction, ranks in ranks_by_direction.items():
        histogram[direction] = np.histogram(ranks, bins=edges)[0].tolist()
    figures = {
        "n_subjects": int(n),
        "retrieval": retrieval,
        "rank_histogram": histogram,
        "topk_curve": {"k": list(range(1, k_max + 1)), **curves, "chance": [k / n for k in range(1, k_max + 1)]},
        "similarity": similarity,
    }
    plot_data = {"ranks": ranks_by_direction, "matched": samples[0], "unmatched_sample": samples[1]}
    return figures, plot_data


def chance_figures(n: int, pool_sizes=()) -> dict:
    """The chance row in the same layout as `method_metrics`' figures (no intervals: exact values)."""
    retrieval = {}
    for direction in DIRECTIONS:
        by_pool = {}
        for size in [*sorted(int(s) for s in pool_sizes), n]:
            levels = chance_levels(size)
            by_pool["all" if size == n else str(size)] = {
                **{m: levels[f"chance_{m}"] for m in RANK_METRICS},
                "pool_size": int(size),
                **levels,
            }
        retrieval[direction] = by_pool
    k_max = min(TOPK_MAX, n)
    chance = [k / n for k in range(1, k_max + 1)]
    return {
        "n_subjects": int(n),
        "retrieval": retrieval,
        "topk_curve": {"k": list(range(1, k_max + 1)), "neuro_to_gene": chance, "gene_to_neuro": chance, "chance": chance},
    }


def val_retrieval(neuro_features, gene_features, chunk: int | None = None) -> dict:
    """Cheap per-epoch validation: top-1 both directions over the whole pool, their mean, the pool
    size and chance (1 / pool)."""
    neuro, genes = _as_tensor(neuro_features), _as_tensor(gene_features)
    _check_pair(neuro, genes)
    n = neuro.shape[0]
    chunk = chunk or chunk_for(n)
    n2g = float(np.mean(retrieval_ranks(neuro, genes, chunk) == 1))
    g2n = float(np.mean(retrieval_ranks(genes, neuro, chunk) == 1))
    return {
        "top1_neuro_to_gene": n2g,
        "top1_gene_to_neuro": g2n,
        "top1_mean": (n2g + g2n) / 2,
        "pool_size": int(n),
        "chance_top1": 1.0 / n,
    }
