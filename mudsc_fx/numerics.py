"""Numerics shared by the statistics and weight passes: moments of a stream of feature
vectors, Pearson correlation from them, Gram helpers, and the one rule that declares a unit
dead.

Moments (:class:`MomentAccumulator`). Rows arrive in chunks. Each chunk is centred on its
own mean in the compute dtype (float32 for float32 models: the expensive products run at
GEMM speed) and its products are added to float64 sums with the pairwise update of Chan,
Golub and LeVeque: for a chunk of ``n_b`` rows with mean ``mu_b`` and centred products
``S_b``, joining ``n_a`` rows with mean ``mu_a`` and centred sums ``M2``::

    M2 <- M2 + S_b + (n_a n_b / (n_a + n_b)) d d^T,   d = mu_b - mu_a
    mu <- mu_a + (n_b / (n_a + n_b)) d

Every term added is a sum of squares, so nothing cancels: the float32 rounding of a product
is relative to the spread of the units, never to their means (a feature of mean 1000 and
spread 0.1 is as accurate as one of mean 0). The between-chunk term rides along as one extra
row of the chunk's GEMM (row ``sqrt(n_a n_b / (n_a + n_b)) d``), so it costs no extra pass.
What remains is the float32 accumulation inside the GEMM kernel: measured at <= 1e-6 on the
correlations (``tests/test_stats.py``; ``docs/scale.md`` has the figures).

Dead units (:func:`dead_units`): a unit whose variance is not finite, is at most
``DEAD_REL_VARIANCE`` times the largest variance of the units it is compared with, or whose
standard deviation is within ``DEAD_ROUNDINGS`` roundings of its mean (its variation is at
the level of the rounding of its own values). Its correlations are meaningless: they are 0
(also on the diagonal), never NaN.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

#: a unit is dead when its variance is at most this times the largest one (std ratio 1e-5)
DEAD_REL_VARIANCE = 1e-10
#: ... or when its standard deviation is at most this many roundings of its mean
DEAD_ROUNDINGS = 16.0

#: rows of one chunk: about this many bytes of compute-dtype buffer ...
CHUNK_BYTES = 32 << 20
#: ... but never fewer rows (the float64 update of a chunk must stay amortised)
CHUNK_MIN_ROWS = 1024
#: rows of M2 per stored block (the lower triangle is kept by blocks of rows): small blocks
#: waste less work on the square diagonal blocks, large ones run the GEMMs faster
def block_rows(m: int) -> int:
    return 64 if m <= 384 else 128 if m <= 1024 else 256


def dead_units(var: torch.Tensor, mean: Optional[torch.Tensor] = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The one dead-unit rule (see the module docstring): a bool mask over ``var``.

    ``mean`` (optional) enables the rounding test, with the resolution of ``dtype`` (the
    dtype the features were computed in).

    >>> dead_units(torch.tensor([1.0, 1e-12, 0.0, float("nan")])).tolist()
    [False, True, True, True]
    >>> dead_units(torch.tensor([1.0, 1e-6]), torch.tensor([0.0, 1e4])).tolist()
    [False, True]
    """
    var = var.double()
    finite = torch.isfinite(var)
    top = float(var[finite].max()) if bool(finite.any()) else 0.0
    dead = ~finite | (var <= DEAD_REL_VARIANCE * max(top, 1e-300))
    if mean is not None:
        tol = DEAD_ROUNDINGS * torch.finfo(dtype).eps
        dead |= ~torch.isfinite(mean.double()) | (var <= (tol * mean.double().abs()) ** 2)
    return dead


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype products are computed in: the features' own, at least float32."""
    return torch.promote_types(dtype, torch.float32)


class Scratch:
    """Reusable buffers of one device, shared by all accumulators of a pass (so memory for
    chunk rows and block products is paid once, for the largest space)."""

    def __init__(self):
        self._flat: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        key = (name, dtype, str(device))
        need = math.prod(shape)
        flat = self._flat.get(key)
        if flat is None or flat.numel() < need:
            flat = self._flat[key] = torch.empty(need, dtype=dtype, device=device)
        return flat[:need].view(shape)


def block_bounds(m: int) -> list[tuple[int, int]]:
    block = block_rows(m)
    return [(a, min(a + block, m)) for a in range(0, m, block)]


def accumulator_bytes(m: int) -> int:
    """float64 memory of a :class:`MomentAccumulator` of size ``m`` (about 4 m^2 bytes)."""
    return 8 * (sum((b - a) * b for a, b in block_bounds(m)) + m)


class MomentAccumulator:
    """Count, mean and centred second moments ``M2 = sum (x - mean)(x - mean)^T`` of a
    stream of row vectors of length ``m`` (see the module docstring for the arithmetic).

    M2 is kept as its lower triangle by blocks of rows: ``blocks[k]`` holds rows
    ``[a, b)`` and columns ``[0, b)`` of ``bounds[k] = (a, b)`` (the diagonal block square),
    all views of the one float64 tensor ``flat`` (what distributed ranks all-reduce).

    >>> acc = MomentAccumulator(3)
    >>> x = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    >>> acc.add([x[:200]]); acc.add([x[200:]])
    >>> corr, dead = acc.correlation()
    >>> bool(np.allclose(corr, np.corrcoef(x.double().numpy().T), atol=1e-6))
    True
    """

    def __init__(self, m: int, device=None, scratch: Optional[Scratch] = None):
        self.m = m
        self.bounds = block_bounds(m)
        sizes = [(b - a) * b for a, b in self.bounds]
        self.flat = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
        offsets = np.cumsum([0] + sizes)
        self.blocks = [self.flat[o:o + s].view(b - a, b) for o, s, (a, b) in zip(offsets, sizes, self.bounds)]
        self.mean = torch.zeros(m, dtype=torch.float64, device=device)
        self.count = 0
        self.dtype: Optional[torch.dtype] = None  # dtype of the features added (for dead_units)
        self.scratch = scratch or Scratch()

    # ------------------------------------------------------------------ adding rows

    def add(self, parts: Sequence[torch.Tensor]) -> None:
        """Add rows given as column blocks: ``parts[i]`` is [items, ..., n_i] and row r of the
        stream is the concatenation of row r of every part, flattening all but the last axis
        (``sum n_i == m``). The parts may be strided views; they are not modified."""
        parts = [p.unsqueeze(0) if p.dim() == 1 else p for p in parts]
        widths = [p.shape[-1] for p in parts]
        if sum(widths) != self.m:
            raise ValueError(f"rows of width {sum(widths)} added to moments of width {self.m}")
        items = parts[0].shape[0]
        if items == 0 or parts[0].numel() == 0:
            return
        per_item = parts[0].numel() // (items * widths[0])
        dtype = compute_dtype(parts[0].dtype)
        self.dtype = parts[0].dtype if self.dtype is None else self.dtype
        rows_max = max(CHUNK_MIN_ROWS, CHUNK_BYTES // (dtype.itemsize * self.m))
        step = max(1, rows_max // max(per_item, 1))
        for a in range(0, items, step):
            chunk = [p[a:a + step] for p in parts]
            rows = chunk[0].shape[0] * per_item
            # a provisional centre: the running mean, or for the first chunk the mean of its
            # first rows (so that the chunk's own mean is summed relative to the spread)
            if self.count:
                centre = self.mean.to(dtype)
            else:
                centre = torch.cat([c[:1].reshape(-1, n)[:64].double().mean(0) for c, n in zip(chunk, widths)]).to(dtype)
            # one spare row at the end: the between-chunk term of the pairwise update
            buf = self.scratch.get("rows", (rows + 1, self.m), dtype, self.flat.device)
            col = 0
            for c, n in zip(chunk, widths):
                torch.sub(c, centre[col:col + n], out=buf[:rows, col:col + n].view(c.shape))
                col += n
            self._add_chunk(buf, rows, centre)

    def _add_chunk(self, buf: torch.Tensor, rows: int, centre: torch.Tensor) -> None:
        """``buf[:rows]`` holds the chunk minus ``centre``: centre it on its own mean, then
        join it to the sums (pairwise update)."""
        x = buf[:rows]
        offset = x.sum(0) / rows  # small: relative to the spread, so float32 is accurate
        x.sub_(offset)
        mean_b = centre.double() + offset.double()
        n_a = self.count
        if n_a:
            d = mean_b - self.mean
            buf[rows] = d * math.sqrt(n_a * rows / (n_a + rows))
            self.mean += d * (rows / (n_a + rows))
            x = buf
        else:
            self.mean.copy_(mean_b)
        self.count = n_a + rows
        self._add_products(x)

    def _add_products(self, x: torch.Tensor) -> None:
        """M2 += x^T x (lower blocks), the products in x's dtype, the sums in float64."""
        for (a, b), blk in zip(self.bounds, self.blocks):
            prod = self.scratch.get("products", (b - a, b), x.dtype, x.device)
            torch.mm(x[:, a:b].T, x[:, :b], out=prod)
            blk.add_(prod)

    # ------------------------------------------------------------------ combining

    def add_moments(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Join another stream given by its moments (``m2``: its full symmetric float64 M2,
        e.g. derived through a linear map), with the pairwise update."""
        if count <= 0:
            return
        mean = mean.to(self.mean)
        n_a = self.count
        d = mean - self.mean
        w = n_a * count / (n_a + count)
        for (a, b), blk in zip(self.bounds, self.blocks):
            blk.add_(m2[a:b, :b].to(blk))
            if n_a:
                blk.addr_(d[a:b], d[:b], alpha=w)
        self.mean += d * (count / (n_a + count)) if n_a else d
        self.count = n_a + count

    def recenter_(self, mean: torch.Tensor) -> None:
        """Express M2 around ``mean`` instead of this stream's own mean
        (``M2 += count (mu - mean)(mu - mean)^T``): the sum of the recentred M2 of several
        streams around their joint mean is the M2 of the joined stream."""
        d = self.mean - mean.to(self.mean)
        if self.count:
            for (a, b), blk in zip(self.bounds, self.blocks):
                blk.addr_(d[a:b], d[:b], alpha=float(self.count))
        self.mean.copy_(mean)

    # ------------------------------------------------------------------ results

    def diagonal(self) -> torch.Tensor:
        """The diagonal of M2 (float64)."""
        return torch.cat([blk[:, a:b].diagonal() for (a, b), blk in zip(self.bounds, self.blocks)]) \
            if self.m else torch.zeros(0, dtype=torch.float64)

    def full_m2(self) -> torch.Tensor:
        """M2 as a full symmetric float64 [m, m] tensor (a copy)."""
        out = torch.empty(self.m, self.m, dtype=torch.float64, device=self.flat.device)
        for (a, b), blk in zip(self.bounds, self.blocks):
            out[a:b, :b] = blk
            out[:a, a:b] = blk[:, :a].T
        return out

    def finite(self) -> bool:
        return bool(torch.isfinite(self.mean).all() and torch.isfinite(self.diagonal()).all())

    def dead(self) -> torch.Tensor:
        var = self.diagonal() / max(self.count, 1)
        return dead_units(var, self.mean, self.dtype or torch.float32)

    def correlation_packed(self, out_dtype: torch.dtype = torch.float32) -> tuple["PackedSymmetric", np.ndarray]:
        """(Pearson correlation as a :class:`PackedSymmetric` of ``out_dtype``, dead-unit
        mask). Rows and columns of dead units are 0 (diagonal too); the rest lies in [-1, 1]
        with an exact 1 on the diagonal. Built block by block: no m x m temporary."""
        dead = self.dead()
        inv = torch.where(dead, torch.zeros_like(self.mean), self.diagonal().clamp_min(1e-300).rsqrt()).cpu()
        alive = (~dead).to(out_dtype).cpu()
        blocks = []
        for (a, b), blk in zip(self.bounds, self.blocks):
            c = (blk.cpu() * inv[a:b, None] * inv[None, :b]).clamp_(-1.0, 1.0).to(out_dtype)
            c[:, a:b].diagonal().copy_(alive[a:b])
            blocks.append(c.numpy())
        return PackedSymmetric(self.m, tuple(self.bounds), tuple(blocks)), dead.cpu().numpy()

    def correlation(self, out_dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, np.ndarray]:
        """(Pearson correlation [m, m] as a numpy array of ``out_dtype``, dead-unit mask): the
        square of :meth:`correlation_packed`."""
        packed, dead = self.correlation_packed(out_dtype)
        return packed.square(), dead


class PackedSymmetric:
    """A symmetric [m, m] matrix kept as its lower triangle by blocks of rows (about half the
    memory of the square): ``blocks[k]`` holds rows ``[a, b)``, columns ``[0, b)`` of
    ``bounds[k] = (a, b)``."""

    def __init__(self, m: int, bounds: tuple, blocks: tuple):
        self.m, self.bounds, self.blocks = m, bounds, blocks

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    def square(self) -> np.ndarray:
        dtype = self.blocks[0].dtype if self.blocks else np.float32
        out = np.empty((self.m, self.m), dtype=dtype)
        for (a, b), blk in zip(self.bounds, self.blocks):
            out[a:b, :b] = blk
            out[:a, a:b] = blk[:, :a].T
        return out

    def rows(self, r1: int) -> np.ndarray:
        """Rows ``[0, r1)`` of the square (e.g. the anchor model's rows of a correlation)."""
        dtype = self.blocks[0].dtype if self.blocks else np.float32
        out = np.empty((r1, self.m), dtype=dtype)
        for (a, b), blk in zip(self.bounds, self.blocks):
            if a < r1:  # rows [a, min(b, r1)), columns [0, b): the lower part
                out[a:min(b, r1), :b] = blk[:min(b, r1) - a]
            if a > 0:   # columns [a, b) of rows [0, min(a, r1)): the transposed lower part
                out[:min(a, r1), a:b] = blk[:, :min(a, r1)].T
        return out


# ---------------------------------------------------------------------- rows of a matrix

def mirror_lower_(a: np.ndarray, block: int = 256) -> np.ndarray:
    """Copy the strict lower triangle of the square C-order array ``a`` onto its upper one, in
    place and by blocks (no m x m temporaries). The upper part must hold zeros (as BLAS syrk
    leaves it): the diagonal blocks add their transpose's strict lower part, exactly."""
    m = a.shape[0]
    for i in range(0, m, block):
        j = min(i + block, m)
        d = a[i:j, i:j]
        d += np.tril(d, -1).T
        if j < m:
            a[i:j, j:] = a[j:, i:j].T
    return a


_GRAM_BLOCK = 512


def gram_rows(Z: torch.Tensor) -> np.ndarray:
    """``Z Z^T`` as a float64 numpy array, exactly symmetric. Only the lower triangle is
    multiplied, by blocks of rows (``Z[i:j] Z[:j]^T``: about half the work of the full product
    for large Z), then mirrored. torch's GEMM on Z's own dtype: on the 2-core benchmark
    machine it is 4-8x faster than scipy's BLAS syrk."""
    m = Z.shape[0]
    G = np.empty((m, m))
    for i in range(0, m, _GRAM_BLOCK):
        j = min(i + _GRAM_BLOCK, m)
        G[i:j, :j] = (Z[i:j] @ Z[:j].T).double().cpu().numpy()
    for i in range(0, m, _GRAM_BLOCK):
        j = min(i + _GRAM_BLOCK, m)
        d = G[i:j, i:j]
        d[...] = np.tril(d) + np.tril(d, -1).T
        if j < m:
            G[i:j, j:] = G[j:, i:j].T
    return G


def _standardize_rows_(Z: torch.Tensor) -> torch.Tensor:
    """Centre and scale the rows of Z in place; returns the dead-row mask (:func:`dead_units`)."""
    D = max(Z.shape[1], 1)
    mean = Z.mean(dim=1) if Z.shape[1] else torch.zeros(Z.shape[0], dtype=Z.dtype)
    Z -= mean[:, None]
    norm = Z.norm(dim=1)
    dead = dead_units(norm.double() ** 2 / D, mean, Z.dtype)
    Z /= torch.where(dead, torch.ones_like(norm), norm)[:, None]
    return dead


def pearson_anchor_rows_(Z: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[0, n)`` of :func:`pearson_rows_` (the anchor model's rows of the stacked
    correlation: n x N n, float64) and the dead-row mask of all rows, overwriting Z. The
    products are those of the full matrix's lower triangle, for n / (N n) of its work."""
    dead = _standardize_rows_(Z)
    C = (Z @ Z[:n].T).double().cpu().numpy().T.copy()  # (n, N n): [k, j] = Z_j . Z_k
    if n:
        A = C[:, :n]
        A[np.triu_indices(n, 1)] = 0.0
        mirror_lower_(A)
    dm = dead.cpu().numpy()
    C[dm[:n], :] = 0.0
    C[:, dm] = 0.0
    C[np.arange(n), np.arange(n)] = (~dm[:n]).astype(C.dtype)
    return np.clip(C, -1.0, 1.0, out=C), dm


def pearson_rows_(Z: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(Correlation between the rows of Z as float64 numpy, dead-row mask), overwriting Z
    (centred and scaled in place). Dead rows (by :func:`dead_units`) give 0 rows/columns.

    >>> Z = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.1], [5.0, 5.0, 5.0]])
    >>> C, dead = pearson_rows_(Z)
    >>> dead.tolist(), round(float(C[0, 1]), 4), float(C[2, 2])
    ([False, False, True], 0.9999, 0.0)
    """
    dead = _standardize_rows_(Z)
    C = gram_rows(Z)
    dm = dead.cpu().numpy()
    C[dm, :] = 0.0
    C[:, dm] = 0.0
    np.fill_diagonal(C, (~dm).astype(C.dtype))
    return np.clip(C, -1.0, 1.0, out=C), dm
