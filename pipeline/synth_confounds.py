"""Confounds and relatives for `genealign synth --confounds / --families`, as in a UK Biobank cohort.

- Covariates (`--confounds`): age, sex (0 female, 1 male, UK Biobank's coding), assessment centre
  (`site_1`..), head size and ten genetic principal components. PC1..PC4 are the generator's
  ancestry factors (which every gene embedding carries), PC5..PC10 six further ancestry factors. The
  site a subject attends depends on PC1/PC2 (geography), head size on sex. They reach the brain
  through spatial maps (age, age², sex, each site, head size) and the genes through the ancestry
  loadings and sex loadings, large on X-linked genes (`X_LINKED`), small on the others. A null
  cohort stays confounded: no gene->brain signal, but sex and ancestry/site show in both modalities.
- Families (`--families F`): a fraction F of subjects in sibling pairs and trios. Siblings share
  half of their genetic factors, nearly all of their ancestry and part of their non-genetic brain
  variation; every subject's marginal law is unchanged.

Pure functions on arrays and random generators; `pipeline.synth` wires them into the generator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.atomic import atomic_write_text

# X-chromosome genes among synth's symbols: their embeddings differ most by sex (one X in males).
X_LINKED = frozenset({"MAOA", "MAOB", "HTR2C", "MECP2", "FMR1", "NLGN3", "NLGN4X", "CDKL5", "DCX", "PLP1"})
N_PCS = 10
COVARIATES_NAME = "covariates.csv"
KINSHIP_NAME = "kinship.dat"


@dataclass(frozen=True)
class ConfoundSpec:
    """Fixed parameters of the confounds and families (recorded in truth.json)."""

    age_mean: float = 64.0
    age_sd: float = 7.5
    age_range: tuple = (45.0, 82.0)
    male_fraction: float = 0.47
    site_probs: tuple = (0.45, 0.3, 0.2, 0.05)
    site_ancestry: float = 2.0  # logit change of a site per unit of PC1/PC2 along that site's direction
    head_mean: float = 1.40  # litres, female
    head_sex: float = 0.13  # males larger
    head_sd: float = 0.10
    pc_sd: tuple = (4.0, 2.5, 2.0, 1.6, 1.4, 1.2, 1.1, 1.0, 0.9, 0.8)
    extra_ancestry_var: float = 0.05  # variance per embedding dimension of PC5..PC10 together
    sex_var_x_linked: float = 0.5  # variance per embedding dimension of the sex effect, X-linked genes
    sex_var_autosomal: float = 0.002
    # Brain coefficients per standardised covariate (maps scaled like the generator's nuisance maps).
    brain_age: float = 1.5
    brain_age2: float = 0.4
    brain_sex: float = 1.0
    brain_site: float = 1.0
    brain_head: float = 1.5
    trio_fraction: float = 0.3  # of families
    genetic_sharing: float = 0.5  # correlation of siblings' genetic factors (z, u, w)
    ancestry_sharing: float = 0.95
    shared_environment: float = 0.3  # share of the non-genetic brain variation common to a family

    @property
    def n_sites(self) -> int:
        return len(self.site_probs)


@dataclass
class Covariates:
    age: np.ndarray  # (N,) years
    sex: np.ndarray  # (N,) int 0/1
    site: np.ndarray  # (N,) int in [0, n_sites)
    head_size: np.ndarray  # (N,) litres
    pcs: np.ndarray  # (N, N_PCS)
    extra_ancestry: np.ndarray  # (N, N_PCS - n_ancestry) standard normal factors behind PC5..


# ------------------------------------------------------------------------------------- families
def draw_families(rng: np.random.Generator, n: int, fraction: float, spec: ConfoundSpec) -> list:
    """Disjoint sibling groups (arrays of subject indices, sizes 2 or 3) covering ~fraction * n subjects."""
    remaining = int(round(fraction * n))
    members = rng.permutation(n)[:remaining]
    families, at = [], 0
    while remaining >= 2:
        size = 3 if remaining == 3 or (remaining >= 5 and rng.random() < spec.trio_fraction) else 2
        families.append(np.sort(members[at : at + size]))
        at, remaining = at + size, remaining - size
    return families


def share_within_families(rng: np.random.Generator, x: np.ndarray, families: list, share: float,
                          sd: float = 1.0) -> None:
    """In place: each family member's row of x (N, k), drawn N(0, sd^2), becomes sqrt(share) * a family
    draw + sqrt(1 - share) * its own: members correlate by `share`, every row keeps its marginal."""
    if not families or x.shape[1] == 0:
        return
    draws = rng.standard_normal((len(families), x.shape[1])) * sd
    for f, members in enumerate(families):
        x[members] = math.sqrt(share) * draws[f] + math.sqrt(1.0 - share) * x[members]


def family_pairs(families: list) -> list:
    """Every within-family pair (i, j), i < j in subject index."""
    return [(int(a), int(b)) for members in families for k, a in enumerate(members) for b in members[k + 1 :]]


# ------------------------------------------------------------------------------------ covariates
def draw_covariates(rng: np.random.Generator, spec: ConfoundSpec, ancestry: np.ndarray, families: list) -> Covariates:
    """Covariates of N subjects whose ancestry factors (N, P) the generator drew (P <= 4: PC1..PCP)."""
    n, p = ancestry.shape
    extra = rng.standard_normal((n, N_PCS - p))
    share_within_families(rng, extra, families, spec.ancestry_sharing)
    pcs = np.concatenate([ancestry, extra], axis=1) * np.asarray(spec.pc_sd)  # (N, N_PCS)
    age = np.clip(rng.normal(spec.age_mean, spec.age_sd, n), *spec.age_range)
    sex = (rng.random(n) < spec.male_fraction).astype(np.int64)
    angles = 2 * math.pi * np.arange(spec.n_sites) / spec.n_sites
    directions = np.stack([np.cos(angles), np.sin(angles)])  # (2, S)
    logits = np.log(spec.site_probs) + spec.site_ancestry * ancestry[:, :2] @ directions[: min(p, 2)]  # (N, S)
    site = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
    head = rng.normal(spec.head_mean, spec.head_sd, n) + spec.head_sex * sex
    return Covariates(age=age, sex=sex, site=site, head_size=head, pcs=pcs, extra_ancestry=extra)


def brain_design(cov: Covariates, spec: ConfoundSpec) -> np.ndarray:
    """(N, 4 + n_sites) brain coefficients of the covariates: age, age², sex, one per site, head
    size, each standardised by the population's law and scaled by its effect."""
    age = (cov.age - spec.age_mean) / spec.age_sd
    head_sd = math.sqrt(spec.head_sd**2 + spec.head_sex**2 / 4)
    head = (cov.head_size - spec.head_mean - spec.head_sex / 2) / head_sd
    sites = np.eye(spec.n_sites)[cov.site] * spec.brain_site  # (N, S)
    columns = [spec.brain_age * age, spec.brain_age2 * (age**2 - 1) / math.sqrt(2),
               spec.brain_sex * (2.0 * cov.sex - 1.0), spec.brain_head * head]
    return np.concatenate([np.stack(columns, axis=1), sites], axis=1)


def gene_confound_loadings(rng: np.random.Generator, spec: ConfoundSpec, dim: int, n_extra: int,
                           x_linked: bool) -> np.ndarray:
    """(D, n_extra + 1) loadings of one gene on PC5.. (standard normal factors) and on sex (±1)."""
    extra = rng.normal(0.0, math.sqrt(spec.extra_ancestry_var / max(n_extra, 1)), (dim, n_extra))
    sex = rng.normal(0.0, math.sqrt(spec.sex_var_x_linked if x_linked else spec.sex_var_autosomal), (dim, 1))
    return np.concatenate([extra, sex], axis=1)


def gene_confound_factors(cov: Covariates) -> np.ndarray:
    """(N, n_extra + 1) the factors `gene_confound_loadings` multiply."""
    return np.concatenate([cov.extra_ancestry, (2.0 * cov.sex - 1.0)[:, None]], axis=1)


# ----------------------------------------------------------------------------------------- truth
def confounds_truth(spec: ConfoundSpec, cov: Covariates, gene_names) -> dict:
    """truth.json's record of the covariates: file, columns, codings, what drives what, the spec."""
    return {
        "file": COVARIATES_NAME,
        "columns": ["IID", "age", "sex", "site", "head_size"] + [f"PC{k + 1}" for k in range(N_PCS)],
        "sex_coding": "0 female, 1 male",
        "sites": [f"site_{s + 1}" for s in range(spec.n_sites)],
        "brain": "age, age^2, sex, site (one map each) and head size, through spatial maps; every subject",
        "genes": "PC1..PC10 (ancestry) in every gene; sex strongly in the X-linked genes, weakly in the others",
        "x_linked_genes": [g for g in gene_names if g in X_LINKED],
        "site_depends_on": ["PC1", "PC2"],
        "head_size_depends_on": ["sex"],
        "counts": {"male": int(cov.sex.sum()), "female": int(len(cov.sex) - cov.sex.sum()),
                   **{f"site_{s + 1}": int(np.sum(cov.site == s)) for s in range(spec.n_sites)}},
        "spec": asdict(spec),
    }


def families_truth(spec: ConfoundSpec, fraction: float, families: list, iid: np.ndarray) -> dict:
    """truth.json's record of the families: sizes, sharing, and every family's IIDs."""
    sizes = [len(m) for m in families]
    return {
        "file": KINSHIP_NAME,
        "fraction": fraction,
        "n_families": len(families),
        "n_related_subjects": int(sum(sizes)),
        "n_pairs": len(family_pairs(families)),
        "sizes": {str(k): sizes.count(k) for k in sorted(set(sizes))},
        "relationship": "full siblings (KING kinship ~0.25)",
        "genetic_sharing": spec.genetic_sharing,
        "ancestry_sharing": spec.ancestry_sharing,
        "shared_environment": spec.shared_environment,
        "members": [sorted(str(iid[s]) for s in members) for members in families],
    }


# --------------------------------------------------------------------------------------- writing
def write_covariates(path, iid: np.ndarray, cov: Covariates) -> None:
    """covariates.csv: IID, age, sex, site, head_size, PC1..PC10; one row a subject, sorted by IID."""
    header = ["IID", "age", "sex", "site", "head_size"] + [f"PC{k + 1}" for k in range(N_PCS)]
    lines = [",".join(header)]
    for s in np.argsort(iid, kind="stable"):
        pcs = ",".join(f"{v:.5f}" for v in cov.pcs[s])
        lines.append(f"{iid[s]},{cov.age[s]:.1f},{cov.sex[s]},site_{cov.site[s] + 1},{cov.head_size[s]:.4f},{pcs}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_kinship(path, rng: np.random.Generator, iid: np.ndarray, families: list) -> None:
    """kinship.dat in UK Biobank's relatedness format (ukb_rel.dat): `ID1 ID2 HetHet IBS0 Kinship`,
    whitespace-separated, one line per related pair; full siblings, KING kinship about 0.25."""
    pairs = family_pairs(families)
    kinship = np.clip(rng.normal(0.25, 0.015, len(pairs)), 0.18, 0.34)
    ibs0 = rng.uniform(0.001, 0.006, len(pairs))
    hethet = np.clip(rng.normal(0.085, 0.01, len(pairs)), 0.05, 0.12)
    lines = ["ID1 ID2 HetHet IBS0 Kinship"]
    for (a, b), h, i, k in zip(pairs, hethet, ibs0, kinship):
        first, second = sorted((int(iid[a]), int(iid[b])))
        lines.append(f"{first} {second} {h:.3f} {i:.4f} {k:.4f}")
    atomic_write_text(path, "\n".join(lines) + "\n")
