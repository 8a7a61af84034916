"""``pool``: average pooling of the patch grid to a sqrt(K) x sqrt(K) grid, the downsampling baseline VTC-Bench
(Chenfei-Liao/VTC-Bench) finds to beat many compression methods.

Rule: CLS is dropped; with k = sqrt(K) (K must be a square) and an R x C patch grid (R, C >= k), patch (r, c)
belongs to bin (floor(r k / R), floor(c k / C)), and each of the k x k rows (bins in raster order) is the mean of
its bin's patches: plain average pooling with a (R/k) x (C/k) kernel when k divides the grid, bins one patch
larger or smaller otherwise. Each row stands at its bin's top-left patch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from visionzip_tune.algorithm.compress import DROPPED, ZipResult
from visionzip_tune.algorithm.compressors.base import GRID, Compressor, Signals


def bins(rows: int, columns: int, side: int, device=None) -> Tensor:
    """(R * C,) int64: the bin (raster index in the side x side grid) of every patch, in raster order."""
    r = torch.arange(rows, device=device) * side // rows
    c = torch.arange(columns, device=device) * side // columns
    return (r.unsqueeze(1) * side + c.unsqueeze(0)).flatten()


def group_mean(hidden: Tensor, groups: Tensor, count: int) -> Tensor:
    """(B, count, D): the mean of the rows of ``hidden`` (B, M, D) in each group, ``groups`` (B, M) in [0, count)
    (negative: in no group). A one-hot matmul in the hidden dtype: deterministic, unlike scatter_add on GPU."""
    one_hot = (groups.unsqueeze(-1) == torch.arange(count, device=hidden.device)).to(hidden.dtype)  # (B, M, count)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    return torch.bmm(one_hot.transpose(1, 2), hidden) / counts


class Pool(Compressor):
    name = "pool"
    reads = frozenset({GRID})
    source = "VTC-Bench (Liao et al.): image downsampling as a compression baseline"

    def check(self, params: dict) -> None:
        super().check(params)
        if math.isqrt(params["tokens"]) ** 2 != params["tokens"]:
            raise ValueError(f"pool: tokens={params['tokens']} is not a square (the pooled grid is sqrt(K) x sqrt(K))")

    def select(self, signals: Signals, params: dict) -> ZipResult:
        rows, columns = signals.grid
        side = math.isqrt(params["tokens"])
        if side > min(rows, columns):
            raise ValueError(f"pool: a {side} x {side} grid of rows from a {rows} x {columns} patch grid")
        batch, offset = signals.hidden.shape[0], int(signals.has_cls)
        patch_bins = bins(rows, columns, side, signals.hidden.device)
        first = torch.full((side * side,), rows * columns, dtype=torch.long, device=patch_bins.device)
        first = first.scatter_reduce(0, patch_bins, torch.arange(rows * columns, device=patch_bins.device), "amin")
        groups = patch_bins.expand(batch, -1)
        if offset:
            groups = torch.cat([groups.new_full((batch, 1), DROPPED), groups], dim=1)
        empty = torch.zeros(batch, 0, dtype=torch.long, device=groups.device)
        return ZipResult(None, empty, (first + offset).expand(batch, -1), groups.contiguous(), None)

    def combine(self, hidden: Tensor, selection: ZipResult) -> Tensor:
        return group_mean(hidden, selection.groups, selection.contextual_indices.shape[1])
