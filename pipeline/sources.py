"""The two input formats, as the seed defines them.

- Gene embeddings: one CSV per gene, `{GENE}_brain_gene_embeddingUKB.csv`, an `IID` column then one
  float column per embedding dimension (256 in UK Biobank).
- Brain latents: one `{IID}_latent.npz` per subject holding one array (key `latent`), shape
  (3, 15, 18, 15) in UK Biobank.

The writer (`synth`) and the reader (`ingest`) both name files through these functions.
"""

from __future__ import annotations

from pathlib import Path

GENE_FILE_SUFFIX = "_brain_gene_embeddingUKB.csv"
LATENT_FILE_SUFFIX = "_latent.npz"
DEFAULT_IID_COLUMN = "IID"
DEFAULT_LATENT_KEY = "latent"


def gene_file_name(gene: str) -> str:
    return f"{gene}{GENE_FILE_SUFFIX}"


def latent_file_name(iid: str) -> str:
    return f"{iid}{LATENT_FILE_SUFFIX}"


def gene_name_of(path: str | Path) -> str:
    name = Path(path).name
    assert name.endswith(GENE_FILE_SUFFIX), name
    return name[: -len(GENE_FILE_SUFFIX)]


def iid_of_latent(path: str | Path) -> str:
    name = Path(path).name
    assert name.endswith(LATENT_FILE_SUFFIX), name
    return name[: -len(LATENT_FILE_SUFFIX)]
