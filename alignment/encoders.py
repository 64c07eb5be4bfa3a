"""The gene side of sequence mode: per-gene input maps, positions, a transformer, pooling, a head.

    genes (B, G, d_in) -> input projection (shared Linear, or one map per gene) -> + sinusoidal
    position -> post-norm TransformerEncoder (GELU, ff 4x) -> mean | max | cls pooling -> LayerNorm
    -> h (B, H) -> bias-free Linear (B, P)  [+ a quadratic head: bias-free Linear of the upper
    triangle of h h^T, (B, H(H+1)/2) -> (B, P)]

The quadratic head lets the gene side express products of the pooled features (interactions between
genes' factors) that a linear read-out of h cannot; `gene_head="quadratic"` in ModelConfig.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

GENE_HEADS = ("linear", "quadratic")


class SinusoidalPositionalEncoding(nn.Module):
    """x + PE[:S], PE[pos, 2i] = sin(pos / 10000^(2i/H)), PE[pos, 2i+1] = cos(...), then dropout.
    Sized for exactly the sequence the model sees (G genes, +1 with a CLS token); not in state_dict."""

    def __init__(self, hidden_dim: int, length: int, dropout: float):
        super().__init__()
        position = torch.arange(length, dtype=torch.float64)[:, None]  # (S, 1)
        div = torch.exp(torch.arange(0, hidden_dim, 2, dtype=torch.float64) * (-math.log(10000.0) / hidden_dim))
        pe = torch.zeros(length, hidden_dim, dtype=torch.float64)  # (S, H)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div[: hidden_dim // 2])
        self.register_buffer("pe", pe.float(), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, H)
        return self.dropout(x + self.pe[: x.shape[1]].to(x.dtype))


class PerGeneLinear(nn.Module):
    """(B, G, d_in) -> (B, G, H) with a separate affine map per gene: weight (G, d_in, H), bias (G, H)."""

    def __init__(self, num_genes: int, in_dim: int, out_dim: int):
        super().__init__()
        self.in_features, self.out_features = in_dim, out_dim
        self.weight = nn.Parameter(torch.empty(num_genes, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(num_genes, out_dim))
        bound = math.sqrt(6.0 / (in_dim + out_dim))  # xavier-uniform of each gene's (d_in, H) map
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, genes: torch.Tensor) -> torch.Tensor:  # (B, G, d_in)
        return torch.einsum("bgd,gdh->bgh", genes, self.weight) + self.bias  # (B, G, H)


def _gene_input_layer(kind: str, num_genes: int, in_dim: int, hidden_dim: int) -> nn.Module:
    if kind == "per_gene":
        return PerGeneLinear(num_genes, in_dim, hidden_dim)
    return nn.Linear(in_dim, hidden_dim)


class GeneSequenceEncoder(nn.Module):
    """(B, G, d_in) -> (B, P), unnormalised: input projection, position, transformer, pooling, LN, head."""

    def __init__(
        self,
        input_dim: int,
        num_genes: int,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        pooling: str,
        projection_dim: int,
        dropout: float,
        gene_projection: str = "shared",
        gene_head: str = "linear",
    ):
        super().__init__()
        self.pooling = pooling
        self.input_projection = _gene_input_layer(gene_projection, num_genes, input_dim, hidden_dim)
        if pooling == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.positional_encoding = SinusoidalPositionalEncoding(
            hidden_dim, num_genes + (1 if pooling == "cls" else 0), dropout
        )
        layer = nn.TransformerEncoderLayer(
            d_model=hidden_dim,
            nhead=num_heads,
            dim_feedforward=4 * hidden_dim,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=False,  # post-norm, as the seed
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_dim)
        self.projection = nn.Linear(hidden_dim, projection_dim, bias=False)
        self.quadratic = None
        if gene_head == "quadratic":
            self.register_buffer("quad_index", torch.triu_indices(hidden_dim, hidden_dim), persistent=False)  # (2, T)
            self.quadratic = nn.Linear(self.quad_index.shape[1], projection_dim, bias=False)

    def _embed(self, genes: torch.Tensor) -> torch.Tensor:
        x = self.input_projection(genes)  # (B, G, H)
        if self.pooling == "cls":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (B, G+1, H)
        return self.positional_encoding(x)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, H) -> (B, P)
        if self.pooling == "mean":
            pooled = x.mean(dim=1)
        elif self.pooling == "max":
            pooled = x.max(dim=1).values
        else:
            pooled = x[:, 0]
        h = self.norm(pooled)  # (B, H)
        if self.quadratic is None:
            return self.projection(h)
        products = (h[:, :, None] * h[:, None, :])[:, self.quad_index[0], self.quad_index[1]]  # (B, H(H+1)/2)
        return self.projection(h) + self.quadratic(products)

    def forward(self, genes: torch.Tensor) -> torch.Tensor:  # (B, G, d_in)
        return self._pool(self.transformer(self._embed(genes)))

    def forward_with_attention(self, genes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same output as forward, computed layer by layer with the attention weights kept:
        ((B, P), (B, L, heads, S, S)). Mirrors nn.TransformerEncoderLayer's post-norm path."""
        x = self._embed(genes)  # (B, S, H)
        weights = []
        for layer in self.transformer.layers:
            attended, w = layer.self_attn(x, x, x, need_weights=True, average_attn_weights=False)  # w (B, h, S, S)
            x = layer.norm1(x + layer.dropout1(attended))
            ff = layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))
            x = layer.norm2(x + layer.dropout2(ff))
            weights.append(w)
        return self._pool(x), torch.stack(weights, dim=1)
