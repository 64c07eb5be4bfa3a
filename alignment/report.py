"""Human-readable outputs of evaluation and training: report.md tables and matplotlib plots.

Reads only the metrics dict that `alignment.evaluate` writes to metrics.json (plus, for the plots,
per-query arrays that are too large for JSON). Tables put every retrieval figure beside its pool
size, direction, chance level and interval. Plots use matplotlib's object API on an Agg canvas (no
pyplot global state, no display needed) and are written atomically (temp file + os.replace).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write, atomic_write_text

DIRECTION_TITLES = {"neuro_to_gene": "neuro→gene", "gene_to_neuro": "gene→neuro"}
COLORS = {"model": "C0", "cca": "C1", "pls": "C2", "oracle": "C3", "covariates": "C4", "chance": "0.4"}
REPORT_NAME = "report.md"
PLOTS = {"topk": "topk_curves.png", "ranks": "rank_histogram.png", "similarity": "similarity.png"}


# ------------------------------------------------------------------------------------- formatting
def _num(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    x = float(x)
    if x != 0 and abs(x) < 10 ** -digits * 10:
        return f"{x:.{digits + 1}f}" if abs(x) >= 1e-4 else f"{x:.1e}"
    return f"{x:.{digits}f}"


def _rank(x) -> str:
    return "—" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def _ci(ci, fmt=_num) -> str:
    return f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""


def _p(p) -> str:
    return "—" if p is None else f"{p:.2g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pool_size(metrics: dict, key: str) -> int:
    return int(metrics["pool_sizes"][metrics["pool_keys"].index(key)])


# --------------------------------------------------------------------------------------- rows
def method_row(metrics: dict, method: str, pool_key: str, name: str | None = None) -> dict:
    """One method's headline figures: top-1 both directions at `pool_key` with intervals, whole-split
    top-1 with bootstrap CIs and permutation p-values, MRR, mean rank, Cohen's d."""
    figures = metrics["methods"][method]
    row = {"name": name or figures["label"], "method": method, "pool_key": pool_key,
           "pool_size": _pool_size(metrics, pool_key), "n_subjects": metrics["n_subjects"]}
    for direction in metrics["directions"]:
        pooled = figures["retrieval"][direction][pool_key]
        whole = figures["retrieval"][direction]["all"]
        row[f"top1_{direction}"] = pooled["top1"]
        row[f"ci_{direction}"] = pooled.get("ci", {}).get("top1")
        row[f"top1_all_{direction}"] = whole["top1"]
        row[f"ci_all_{direction}"] = whole.get("ci", {}).get("top1")
        row[f"p_{direction}"] = whole.get("p_value_top1")
        row[f"mrr_{direction}"] = whole["mrr"]
        row[f"mean_rank_{direction}"] = whole["mean_rank"]
        row["chance_top1"] = pooled["chance_top1"]
    row["cohens_d"] = (figures.get("similarity") or {}).get("cohens_d")
    return row


def headline_rows(metrics: dict) -> list[dict]:
    """Rows for the CLI's table and report.md: each method in order, chance last."""
    return [method_row(metrics, m, metrics["headline_pool"]) for m in metrics["methods_order"]]


def comparison_rows(evaluations: list[tuple[str, dict]]) -> tuple[list[dict], int, int]:
    """Several evaluations (label, metrics) of the same split in one table: each model (named by its
    label), its baselines and oracle, then chance once. Returns (rows, pool size, N)."""
    first = evaluations[0][1]
    pool_key = "1000" if all("1000" in m["pool_keys"] for _, m in evaluations) else "all"
    rows = []
    for label, metrics in evaluations:
        for method in metrics["methods_order"]:
            if method == "chance":
                continue
            name = label if method == "model" else metrics["methods"][method]["label"]
            if any(r["name"] == name for r in rows):  # e.g. the same oracle twice
                continue
            rows.append({**method_row(metrics, method, pool_key, name), "evaluation": label})
    rows.append({**method_row(first, "chance", pool_key), "evaluation": None})
    return rows, _pool_size(first, pool_key), int(first["n_subjects"])


def holm_cells(rows: list[dict], directions) -> dict[tuple[int, str], float]:
    """(row index, direction) -> Holm-adjusted p over every p-value of a headline table (one family:
    all methods, both directions), so a reader scanning it for p < 0.05 keeps the family-wise error
    at 5%. Cells without a p are absent."""
    from alignment.metrics import holm_adjust

    cells = [(i, d) for i, r in enumerate(rows) for d in directions if r.get(f"p_{d}") is not None]
    return dict(zip(cells, holm_adjust([rows[i][f"p_{d}"] for i, d in cells]))) if cells else {}


def _headline_table(rows: list[dict], directions, pool_size: int, n: int) -> str:
    """Rows x (top-1 per pool and direction, whole-split top-1, p, MRR, effect size). Each p is shown
    raw and, in brackets, Holm-adjusted over the table (`holm_cells`)."""
    adjusted = holm_cells(rows, directions)
    header = ["method"]
    for d in directions:
        header.append(f"top-1 {DIRECTION_TITLES[d]}, pool {pool_size:,} [95% CI]")
    for d in directions:
        header.append(f"top-1 {DIRECTION_TITLES[d]}, whole split {n:,} [95% CI]")
        header.append(f"p {DIRECTION_TITLES[d]} (Holm, {len(adjusted)} tests)")
    header += ["MRR n→g / g→n", "Cohen's d"]
    body = []
    for i, r in enumerate(rows):
        cells = [f"**{r['name']}**" if r["method"] == "model" else r["name"]]
        cells += [_num(r[f"top1_{d}"]) + _ci(r[f"ci_{d}"]) for d in directions]
        for d in directions:
            p_text = _p(r[f"p_{d}"]) + (f" ({_p(adjusted[(i, d)])})" if (i, d) in adjusted else "")
            cells += [_num(r[f"top1_all_{d}"]) + _ci(r[f"ci_all_{d}"]), p_text]
        cells.append(" / ".join(_num(r[f"mrr_{d}"]) for d in directions))
        cells.append(_num(r["cohens_d"], 2) if r["cohens_d"] is not None else "—")
        body.append(cells)
    return _table(header, body)


def comparison_markdown(rows: list[dict], pool_size: int, n: int, reports: list[tuple[str, Path]],
                        base: Path | None = None, versus: list[str] = ()) -> str:
    """The demo's report: one table across evaluations, with links to each evaluation's report
    (relative to `base`, the folder the markdown is written to, when given)."""
    import os

    if base is not None:
        reports = [(label, Path(os.path.relpath(Path(path).resolve(), Path(base).resolve()))) for label, path in reports]
    directions = ("neuro_to_gene", "gene_to_neuro")
    lines = [
        "# genealign: models vs baselines vs oracle vs chance",
        "",
        f"Held-out test split, N = {n:,} subjects. Top-1 retrieval out of random pools of {pool_size:,} subjects "
        "(mean over draws, 95% interval over draws) and out of the whole split (95% bootstrap CI, permutation "
        "p-value of top-1), in both directions: neuro→gene (a brain latent retrieves its subject's genes) and "
        "gene→neuro. Baselines are fitted on the train split, on the same genes as the model they sit under.",
        "",
        _headline_table(rows, directions, pool_size, n),
        "",
        *[f"- {line}" for line in versus],
        *([""] if versus else []),
        "Full figures (top-5/10, ranks, MRR, every pool, plots): "
        + "; ".join(f"[{label}]({Path(path).as_posix()})" for label, path in reports) + ".",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- report.md
def _sentence(metrics: dict) -> str:
    n = metrics["n_subjects"]
    pools = [int(s) for k, s in zip(metrics["pool_keys"], metrics["pool_sizes"]) if k != "all"]
    pool_text = (
        f"random pools of {', '.join(f'{p:,}' for p in pools)} subjects ({metrics['draws']} draws each; mean over "
        "draws, 95% interval = 2.5–97.5 percentiles over draws) and "
        if pools else ""
    )
    genes = metrics["gene_names"]
    gene_text = f"gene {genes[0]}" if metrics["mode"] == "single" else f"{len(genes)} genes"
    return (
        f"Split **{metrics['split']}** of store `{metrics['store']}`: N = {n:,} subjects; {metrics['mode']}-mode "
        f"checkpoint ({gene_text}). Retrieval in both directions — neuro→gene: each subject's brain latent "
        "queries the gene features of every subject in the pool; gene→neuro: the reverse — on "
        f"{pool_text}the whole split (95% bootstrap CI from {metrics['bootstrap']:,} resamples of the queries; "
        f"p = permutation test of top-1 with {metrics['permutations']:,} shuffles). Baselines are fitted on the "
        "train split only, on the same genes as the model; chance is exact."
    )


def _detail_table(metrics: dict, pool_key: str) -> str:
    whole = pool_key == "all"
    header = ["method", "direction", "top-1", "top-5", "top-10", "mean rank", "median rank", "MRR"]
    header += ["p (top-1)"] if whole else []
    body = []
    for method in metrics["methods_order"]:
        for direction in metrics["directions"]:
            f = metrics["methods"][method]["retrieval"][direction][pool_key]
            ci = f.get("ci") or {}
            cells = [metrics["methods"][method]["label"], DIRECTION_TITLES[direction]]
            cells += [_num(f[m]) + _ci(ci.get(m)) for m in ("top1", "top5", "top10")]
            cells += [_rank(f["mean_rank"]) + _ci(ci.get("mean_rank"), _rank), _rank(f["median_rank"]) + _ci(ci.get("median_rank"), _rank)]
            cells.append(_num(f["mrr"]) + _ci(ci.get("mrr")))
            if whole:
                cells.append(_p(f.get("p_value_top1")))
            body.append(cells)
    return _table(header, body)


def versus_strongest(metrics: dict) -> str | None:
    """One sentence: the model's headline top-1 (mean of both directions) against the baseline that
    did best on the val split, or None when no baseline was scored on val."""
    name = metrics.get("strongest_baseline")
    if not name or "model" not in metrics["methods"]:
        return None
    pool_key = metrics["headline_pool"]
    model, base = (method_row(metrics, m, pool_key) for m in ("model", name))
    mean = lambda row: (row["top1_neuro_to_gene"] + row["top1_gene_to_neuro"]) / 2  # noqa: E731
    # A ratio of two chance-level figures is noise: say so instead (p of the whole-split top-1, both directions).
    at_chance = lambda row: all((row.get(f"p_{d}") or 0) >= 0.05 for d in metrics["directions"])  # noqa: E731
    ratio = f"= {mean(model) / mean(base):.2f}x the strongest baseline" if mean(base) > 0 else "(baseline at 0)"
    chance_level = [label for label, row in (("the model", model), ("the baseline", base)) if at_chance(row)]
    if chance_level:
        ratio = f"({' and '.join(chance_level)} at chance, p >= 0.05 both ways: no ratio)"
    return (f"Strongest baseline (best on the val split): {metrics['methods'][name]['label']}, top-1 {mean(base):.3f} "
            f"(mean of both directions, pool {_pool_size(metrics, pool_key):,}, chance {1 / _pool_size(metrics, pool_key):.4f}); "
            f"the model: {mean(model):.3f} {ratio}.")


def report_markdown(metrics: dict, plot_names: dict | None = None) -> str:
    pool_key = metrics["headline_pool"]
    pool_size = _pool_size(metrics, pool_key)
    n = metrics["n_subjects"]
    lines = [
        f"# Retrieval evaluation of `{metrics['checkpoint']}`",
        "",
        _sentence(metrics),
        "",
        *([versus_strongest(metrics), ""] if versus_strongest(metrics) else []),
        f"## Headline: top-1 out of {pool_size:,}" + (" (the whole split)" if pool_key == "all" else ""),
        "",
        _headline_table(headline_rows(metrics), list(metrics["directions"]), pool_size, n),
        "",
        f"## Whole split (pool = N = {n:,}; 95% bootstrap CI)",
        "",
        _detail_table(metrics, "all"),
        "",
    ]
    for key in metrics["pool_keys"]:
        if key == "all":
            continue
        lines += [f"## Random pools of {int(key):,} ({metrics['draws']} draws; 95% interval over draws)", "",
                  _detail_table(metrics, key), ""]
    sim_rows = []
    for method in metrics["methods_order"]:
        s = metrics["methods"][method].get("similarity")
        if s:
            sim_rows.append([
                metrics["methods"][method]["label"],
                "oracle score" if method == "oracle" else "cosine",
                f"{s['matched_mean']:.3f} ± {s['matched_sd']:.3f}",
                f"{s['unmatched_mean']:.3f} ± {s['unmatched_sd']:.3f}",
                f"{s['cohens_d']:.2f}",
            ])
    lines += ["## Matched vs unmatched pairs (whole split)", "",
              _table(["method", "score", "matched mean ± sd", "unmatched mean ± sd", "Cohen's d"], sim_rows), ""]
    fit_lines = []
    for method in metrics["methods_order"]:
        fit = metrics["methods"][method].get("fit")
        if fit and method == "covariates":
            fit_lines.append(_covariates_line(metrics["methods"][method]["label"], fit))
        elif fit and method != "oracle":
            corr = ", ".join(f"{c:.2f}" for c in (fit.get("train_correlations") or [])[:6] if c is not None)
            per_gene = f", {fit['per_gene_dim']} whitened components per gene before the joint PCA" if fit.get("per_gene_dim") else ""
            chosen = ", ".join(f"{k} {v}" for k, v in fit.items() if k in ("alpha", "rank", "brain_dim", "genes_kept",
                                                                             "quadratic_pcs") and v is not None)
            val = f"; val top-1 {fit['val_top1']:.3f}" if fit.get("val_top1") is not None else ""
            strongest = " **(strongest on val)**" if fit.get("strongest_on_val") else ""
            fit_lines.append(
                f"- {metrics['methods'][method]['label']}{strongest}: fitted on {fit['n_fit_rows']:,} train subjects; PCA to "
                f"{fit['neuro_pca_dim']} (neuro) and {fit['gene_pca_dim']} (genes){per_gene}; {fit['n_components']} "
                f"components (train correlations {corr})" + (f"; chosen on val: {chosen}" if chosen else "") + f"{val}."
            )
        elif fit:
            fit_lines.append(f"- {metrics['methods'][method]['label']}: the generator's true parameters from `{fit['truth']}`; "
                             "score = its log-likelihood ratio (dot product of its features).")
    if fit_lines:
        lines += ["## Baselines and oracle", "", *fit_lines, ""]
    lines += ["## Covariates and relatives", "", *[f"- {line}" for line in confound_lines(metrics)], ""]
    if plot_names:
        lines += ["## Plots", ""]
        lines += [f"![{name}]({file})" for name, file in plot_names.items()]
        lines.append("")
    if metrics.get("notes"):
        lines += ["## Notes", "", *[f"- {note}" for note in metrics["notes"]], ""]
    lines += ["## How the figures are computed", "", *[f"- {k}: {v}." for k, v in metrics["statistics"].items()], ""]
    return "\n".join(lines)


def confound_lines(metrics: dict) -> list[str]:
    """What was residualised, and whether relatives were kept within one split."""
    residual = metrics.get("residualize") or {}
    lines = [residual.get("summary") or "Covariate residualisation not recorded (a checkpoint from before it existed)."]
    if residual.get("terms"):
        lines.append(f"Design terms ({len(residual['terms'])}): {', '.join(residual['terms'])}.")
    note = (metrics.get("relatedness") or {}).get("note")
    lines.append(note or "Relatedness controlled: relatives were kept within one split (ingest --kinship).")
    return lines


def _covariates_line(label: str, fit: dict) -> str:
    chosen = ", ".join(f"{k} {fit[k]}" for k in ("alpha", "brain_dim", "rank") if fit.get(k) is not None)
    val = f"; val top-1 {fit['val_top1']:.3f}" if fit.get("val_top1") is not None else ""
    return (f"- {label}: the gene side replaced by the subject's covariate design ({len(fit['covariates_design'])} "
            f"terms), fitted on {fit['n_fit_rows']:,} train subjects; chosen on val: {chosen}{val}. Near chance when the "
            "brain is residualised on the same covariates; without residualisation it shows what confounds alone retrieve.")


# ------------------------------------------------------------------------------------------ plots
def _figure(ncols: int, nrows: int = 1, width: float = 5.5, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def plot_topk(metrics: dict, path: Path) -> Path:
    """Top-k accuracy vs k on the whole split, both directions, every method, and chance."""
    directions = list(metrics["directions"])
    fig, axes = _figure(len(directions))
    for ax, direction in zip(axes[0], directions):
        for method in metrics["methods_order"]:
            curve = metrics["methods"][method]["topk_curve"]
            style = dict(color=COLORS.get(method), label=metrics["methods"][method]["label"])
            if method == "chance":
                ax.plot(curve["k"], curve["chance"], linestyle="--", **style)
            else:
                ax.plot(curve["k"], curve[direction], **style)
        ax.set_title(f"{DIRECTION_TITLES[direction]}, pool = whole {metrics['split']} split (N={metrics['n_subjects']:,})")
        ax.set_xlabel("k")
        ax.set_ylabel("top-k accuracy")
        ax.set_ylim(0, min(1.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def plot_rank_histogram(metrics: dict, path: Path) -> Path:
    """Distribution of the true pair's rank (whole split); chance is flat."""
    directions = list(metrics["directions"])
    fig, axes = _figure(len(directions))
    for ax, direction in zip(axes[0], directions):
        for method in metrics["methods_order"]:
            if method == "chance":
                continue
            hist = metrics["methods"][method]["rank_histogram"]
            edges = np.asarray(hist["bin_edges"], dtype=float)
            frac = np.asarray(hist[direction], dtype=float) / metrics["n_subjects"]
            ax.stairs(frac, edges, color=COLORS.get(method), label=metrics["methods"][method]["label"])
        edges = np.asarray(metrics["methods"][metrics["methods_order"][0]]["rank_histogram"]["bin_edges"], dtype=float)
        ax.stairs(np.diff(edges) / metrics["n_subjects"], edges, color=COLORS["chance"], linestyle="--", label="chance")
        ax.set_title(f"rank of the true pair, {DIRECTION_TITLES[direction]} (N={metrics['n_subjects']:,})")
        ax.set_xlabel("rank (1 = retrieved first)")
        ax.set_ylabel("fraction of queries")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def plot_similarity(metrics: dict, plot_data: dict, path: Path) -> Path:
    """Matched vs unmatched pair scores per method (unmatched: one random other subject per query)."""
    methods = [m for m in metrics["methods_order"] if m in plot_data]
    fig, axes = _figure(len(methods), width=4.5)
    for ax, method in zip(axes[0], methods):
        matched = np.asarray(plot_data[method]["matched"])
        unmatched = np.asarray(plot_data[method]["unmatched_sample"])
        lo, hi = np.percentile(np.concatenate([matched, unmatched]), [0.5, 99.5])
        bins = np.linspace(lo, hi, 40) if hi > lo else 10
        ax.hist(unmatched, bins=bins, density=True, alpha=0.5, color="0.5", label="unmatched")
        ax.hist(matched, bins=bins, density=True, alpha=0.5, color=COLORS.get(method), label="matched")
        d = metrics["methods"][method]["similarity"]["cohens_d"]
        ax.set_title(f"{metrics['methods'][method]['label']}\nCohen's d = {d:.2f}" if d is not None else method, fontsize=9)
        ax.set_xlabel("oracle score" if method == "oracle" else "cosine similarity")
        ax.legend(fontsize=8)
    return _save(fig, path)


def write_report(metrics: dict, plot_data: dict, out_dir: Path) -> tuple[Path, dict]:
    """Plots, then report.md (which links them). Returns (report path, {plot name: path})."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "topk": plot_topk(metrics, out_dir / PLOTS["topk"]),
        "ranks": plot_rank_histogram(metrics, out_dir / PLOTS["ranks"]),
        "similarity": plot_similarity(metrics, plot_data, out_dir / PLOTS["similarity"]),
    }
    names = {"top-k curves": PLOTS["topk"], "rank histogram": PLOTS["ranks"], "matched vs unmatched": PLOTS["similarity"]}
    report = atomic_write_text(out_dir / REPORT_NAME, report_markdown(metrics, names))
    return report, plots


def plot_training_curves(history: list[dict], path: Path) -> Path:
    """Training history (train.py's per-epoch rows): losses, val top-1 vs chance, LR, temperature."""
    epochs = [r["epoch"] for r in history]
    fig, axes = _figure(2, 2, width=5.0, height=3.4)

    def series(key):
        return [r.get(key, float("nan")) if r.get(key) is not None else float("nan") for r in history]

    ax = axes[0][0]
    ax.plot(epochs, series("train_loss"), label="train")
    ax.plot(epochs, series("val_loss"), label="val")
    ax.set_title("contrastive loss")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.plot(epochs, series("val_top1_neuro_to_gene"), label="neuro→gene")
    ax.plot(epochs, series("val_top1_gene_to_neuro"), label="gene→neuro")
    ax.plot(epochs, series("val_chance_top1"), linestyle="--", color="0.4", label="chance")
    pool = history[-1].get("val_pool_size")
    ax.set_title(f"val top-1 (pool {pool:,})" if isinstance(pool, int) else "val top-1")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    lrs = series("lr")
    ax.plot(epochs, lrs)
    ax.set_title("learning rate")
    if len({v for v in lrs if v == v and v > 0}) > 1:  # a log axis needs two distinct positive values
        ax.set_yscale("log")
    ax = axes[1][1]
    ax.plot(epochs, series("temperature"))
    ax.set_title("exp(logit_scale)")
    for row in axes:
        for ax in row:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    return _save(fig, Path(path))
