"""The brain latent's spatial structure in `genealign synth`: smooth maps made of Gaussian blobs, a
separable Gaussian blur along each spatial axis, and the exact whitener of the generator's noise
(blurred + white). Latents are flattened in C order: (channels, *grid) -> V values.
"""

from __future__ import annotations

import numpy as np


def blur_matrix(n: int, width: float) -> np.ndarray:
    """(n, n) Gaussian blur, rows of unit norm, so blurred unit white noise has unit variance."""
    pos = np.arange(n)
    k = np.exp(-((pos[:, None] - pos[None, :]) ** 2) / (2.0 * width**2))
    return k / np.linalg.norm(k, axis=1, keepdims=True)


def blob_map(rng: np.random.Generator, latent_shape: tuple, spec: GeneratorSpec) -> np.ndarray:
    """(V,) sum of Gaussian blobs, an independent set per channel (axis 0)."""
    grid = latent_shape[1:]
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), axis=-1).reshape(-1, len(grid))
    channels = []
    for _ in range(latent_shape[0]):
        centres = rng.uniform(0, 1, (spec.blobs_per_channel, len(grid))) * (np.asarray(grid) - 1)
        amps = rng.standard_normal(spec.blobs_per_channel)
        d2 = ((coords[None, :, :] - centres[:, None, :]) ** 2).sum(-1)  # (blobs, voxels)
        channels.append(amps @ np.exp(-d2 / (2.0 * spec.blob_width**2)))
    return np.concatenate(channels)


def apply_axes(x: np.ndarray, mats: list, latent_shape: tuple) -> np.ndarray:
    """x (n, V) -> each spatial axis a (latent axes 1..) multiplied by mats[a]:
    y[.., i, ..] = sum_j mats[a][i, j] x[.., j, ..]. Keeps x's float dtype."""
    dims = (x.shape[0], *latent_shape)
    y = x
    for axis, mat in enumerate(mats, start=2):
        before, after = int(np.prod(dims[:axis])), int(np.prod(dims[axis + 1 :]))
        y = np.matmul(mat.astype(x.dtype), y.reshape(before, dims[axis], after))  # (before, n_axis, after)
    return y.reshape(x.shape[0], -1)


class Whitener:
    """Whitens brain noise: cov = smooth_sd^2 * (blur blur^T along every spatial axis) + white_sd^2 * I,
    diagonal in the Kronecker eigenbasis of the per-axis blur covariances."""

    def __init__(self, latent_shape: tuple, blur: list, spec: GeneratorSpec):
        self.latent_shape = latent_shape
        self.V = int(np.prod(latent_shape))
        self.bases, eig = [], np.ones(latent_shape[1:])
        for axis, k in enumerate(blur):
            values, vectors = np.linalg.eigh(k @ k.T)
            self.bases.append(vectors.T)  # rotate into the eigenbasis
            shape = [1] * len(blur)
            shape[axis] = len(values)
            eig = eig * np.clip(values, 0.0, None).reshape(shape)
        var = spec.smooth_sd**2 * eig + spec.white_sd**2  # (grid,)
        self.inv_sd = np.broadcast_to(1.0 / np.sqrt(var), latent_shape).reshape(-1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return apply_axes(np.asarray(x, dtype=np.float64), self.bases, self.latent_shape) * self.inv_sd
