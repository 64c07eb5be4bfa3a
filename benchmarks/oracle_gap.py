"""Where the gap between a learned model and the oracle comes from, on a `genealign synth` cohort.

    python benchmarks/oracle_gap.py --store data/demo/cohort.zarr --cohort data/demo/cohort

Replaces one side of the oracle at a time by something learned on the train split and scores the
held-out test split the same way (top-1 out of random pools of 1,000, both directions):

- every pair is scored by log p(b | a) - log p(b) under a joint Gaussian of (gene side a, brain
  side b) fitted on the train split (on val when `a` was itself fitted on train, so the fit is not
  flattered by training-set predictions); with the oracle's exact a and b this reproduces the oracle;
- brain side: the oracle's exact GLS coefficients c (known maps and noise), or the top-k principal
  components of the z-scored latent (what a learned linear brain encoder can see);
- gene side: the oracle's exact posterior mean mu of the brain components, or a ridge regression /
  a 2-hidden-layer MLP from per-gene PCA-24 features to c, fitted on train with c as the target:
  a supervised learner handed the exact brain coefficients, a far easier task than contrastive
  learning, on all genes or on only the 14 genes the truth says carry signal.

An analysis, not a speed benchmark: `make bench` does not run it. Several minutes on 2 CPU cores
(10 minutes for 22,000 train subjects).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import open_store  # noqa: E402
from pipeline.oracle import _gene_posterior, _model_from_truth, _observed_coefficients  # noqa: E402
from pipeline.synth import _components, load_truth  # noqa: E402

SPLITS = ("train", "val", "test")


def load_splits(view, truth) -> dict:
    """Per split: neuro (n, V), genes (n, G, D), the oracle's mu (n, M) and GLS coefficients c (n, M)."""
    model = _model_from_truth(truth)
    k2 = model.spec.n_factors + 2
    gene_idx = [model.gene_names.index(g) for g in view.gene_names]
    out = {}
    for split in SPLITS:
        neuro, genes = view.read_rows(view.indices(split))
        mean, cov = _gene_posterior(model, gene_idx, genes)
        mu = model.config.signal * _components(model, mean[:, :k2], cov[:k2, :k2])
        out[split] = {"neuro": neuro, "genes": genes, "mu": mu, "c": _observed_coefficients(model, neuro)[0]}
    return out


def gaussian_score(a_fit, b_fit, a, b) -> np.ndarray:
    """(n, n) score[i, j] = log p(b_j | a_i) - log p(b_j) (constants dropped), joint Gaussian fitted
    on (a_fit, b_fit)."""
    am, bm = a_fit.mean(0), b_fit.mean(0)
    A, B = a_fit - am, b_fit - bm
    n = len(A)
    saa = A.T @ A / n + 1e-6 * np.eye(A.shape[1])
    sbb = B.T @ B / n + 1e-6 * np.eye(B.shape[1])
    sba = B.T @ A / n
    w = sba @ np.linalg.inv(saa)
    pi, si = np.linalg.inv(sbb - w @ sba.T), np.linalg.inv(sbb)
    pred, obs = (a - am) @ w.T, b - bm
    return (
        (pred @ pi) @ obs.T
        - 0.5 * np.einsum("nm,mk,nk->n", pred, pi, pred)[:, None]
        - 0.5 * np.einsum("nm,mk,nk->n", obs, pi - si, obs)[None, :]
    )


def top1(a_fit, b_fit, a, b, pool: int = 1000, draws: int = 10) -> tuple[float, float]:
    """Mean top-1 (gene->brain, brain->gene) over random pools; ties count as misses."""
    rng = np.random.default_rng(0)
    g2b = b2g = 0.0
    for _ in range(draws):
        rows = rng.choice(len(a), size=min(pool, len(a)), replace=False)
        score = gaussian_score(a_fit, b_fit, a[rows], b[rows])
        diag = np.diag(score).copy()
        np.fill_diagonal(score, -np.inf)
        g2b += np.mean(diag > score.max(1))
        b2g += np.mean(diag > score.max(0))
    return g2b / draws, b2g / draws


def gene_features(data: dict, cols: list[int], k: int = 24) -> dict:
    """Per-gene z-score + PCA-k whitening fitted on train, concatenated: split -> (n, len(cols) * k)."""
    out = {s: [] for s in SPLITS}
    for j in cols:
        x = data["train"]["genes"][:, j]
        m, sd = x.mean(0), x.std(0) + 1e-6
        _, sv, vt = np.linalg.svd((x - m) / sd, full_matrices=False)
        scale = sv[:k] / np.sqrt(len(x))
        for s in SPLITS:
            out[s].append((((data[s]["genes"][:, j] - m) / sd) @ vt[:k].T) / scale)
    return {s: np.concatenate(out[s], 1) for s in SPLITS}


def ridge(features: dict, target: dict, lam: float) -> dict:
    x, y = features["train"], target["train"]
    xm, ym = x.mean(0), y.mean(0)
    w = np.linalg.solve((x - xm).T @ (x - xm) + lam * len(x) * np.eye(x.shape[1]), (x - xm).T @ (y - ym))
    return {s: (features[s] - xm) @ w + ym for s in SPLITS}


def mlp(features: dict, target: dict, hidden: int = 256, patience: int = 10) -> tuple[dict, int]:
    """2 hidden GELU layers, input dropout 0.2, AdamW; early stopping on val MSE."""
    torch.manual_seed(0)
    x = {s: torch.tensor(features[s], dtype=torch.float32) for s in SPLITS}
    y = {s: torch.tensor(target[s], dtype=torch.float32) for s in SPLITS}
    net = torch.nn.Sequential(
        torch.nn.Dropout(0.2), torch.nn.Linear(x["train"].shape[1], hidden), torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, y["train"].shape[1]),
    )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-3)
    best, state, since, epoch = float("inf"), None, 0, 0
    for epoch in range(1, 201):
        net.train()
        order = torch.randperm(len(x["train"]))
        for i in range(0, len(order), 256):
            b = order[i : i + 256]
            loss = ((net(x["train"][b]) - y["train"][b]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val = ((net(x["val"]) - y["val"]) ** 2).mean().item()
        if val < best - 1e-4:
            best, state, since = val, {k: t.clone() for k, t in net.state_dict().items()}, 0
        else:
            since += 1
            if since >= patience:
                break
    net.load_state_dict(state)
    net.eval()
    with torch.no_grad():
        return {s: net(x[s]).double().numpy() for s in SPLITS}, epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--cohort", required=True, help="the synth folder holding truth.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    view, truth = open_store(args.store), load_truth(args.cohort)
    data = load_splits(view, truth)
    print(f"store {args.store}: " + ", ".join(f"{s} {len(data[s]['mu']):,}" for s in SPLITS)
          + "; test top-1 out of pools of 1,000 (chance 0.001), gene->brain / brain->gene", flush=True)

    def show(name: str, fit: str, a: dict, b: dict) -> None:
        g2b, b2g = top1(a[fit], b[fit], a["test"], b["test"])
        print(f"  {name:72s} {g2b:.3f} / {b2g:.3f}   mean {(g2b + b2g) / 2:.3f}", flush=True)

    mu, c = ({s: data[s][key] for s in SPLITS} for key in ("mu", "c"))
    show("oracle: exact mu vs exact GLS c", "train", mu, c)
    neuro_mean = data["train"]["neuro"].mean(0)
    neuro_sd = data["train"]["neuro"].std(0) + 1e-6
    _, _, vt = np.linalg.svd((data["train"]["neuro"][:8000] - neuro_mean) / neuro_sd, full_matrices=False)
    brain = {k: {s: ((data[s]["neuro"] - neuro_mean) / neuro_sd) @ vt[:k].T for s in SPLITS} for k in (32, 128)}
    for k, feats in brain.items():
        show(f"brain side learned: exact mu vs brain PCA-{k}", "train", mu, feats)

    names = list(view.gene_names)
    signal = [names.index(g) for g in list(truth["causal_genes"]) + list(truth["interaction"]["genes"]) if g in names]
    for label, cols in ((f"{len(signal)} signal genes (given)", signal), (f"all {len(names)} genes", list(range(len(names))))):
        feats = gene_features(data, cols)
        best = max((ridge(feats, c, lam) for lam in (1e-3, 1e-2, 1e-1)),
                   key=lambda p: np.mean(top1(p["val"], c["val"], p["val"], c["val"])))
        show(f"gene side learned: ridge({label}) -> c, vs exact c", "val", best, c)
        pred, epochs = mlp(feats, c)
        show(f"gene side learned: MLP({label}, {epochs} ep) -> c, vs exact c", "val", pred, c)
        show(f"both learned: MLP({label}) vs brain PCA-32", "val", pred, brain[32])
    print(f"{time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
