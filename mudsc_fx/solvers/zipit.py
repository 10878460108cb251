"""ZipIt's greedy zip matching (docs/algorithms.md, "Zip"): pure numpy, no torch.

Units of N models are stacked: in an (N n, N n) similarity C, model i owns rows i*n:(i+1)*n.
:func:`zip_match` clusters the N n units into ``target`` clusters in O(n^2 log n);
:func:`zip_match_reference` is the naive O(n^3) loop it must agree with, label for label.
"""
from __future__ import annotations

import logging

import numpy as np

__all__ = ["zip_match", "zip_match_fast", "zip_match_reference", "units_per_model"]

_NEG = -np.inf
logger = logging.getLogger(__name__)


def units_per_model(C: np.ndarray, n_models: int) -> int:
    if C.ndim != 2 or C.shape[0] != C.shape[1] or n_models < 1 or C.shape[0] % n_models:
        raise ValueError(f"similarity of shape {C.shape} is not (N n, N n) for N = {n_models}")
    return C.shape[0] // n_models


# ---------------------------------------------------------------- zip (ZipIt greedy)
#
# Semantics shared by both implementations. A cluster is represented by its smallest member
# unit index r (merging j into i keeps min(i, j)), and "the model of a cluster" is r // n, the
# model of that smallest member. This is what the public ZipIt code does implicitly (the merged
# column keeps the lower matrix position and its origin tag), so a pair is same-model iff the
# two clusters' smallest members come from one model, and the budget charged is that model's.
# The discount ``a`` applies to the pairs of a merged cluster that would put two units of one
# model into one cluster (ZipIt discounts every pair of a merged cluster; for N = 2 that is the
# same thing, since a merged cluster shares a model with every other cluster). For N > 2 a
# cluster that still lacks a model keeps its full similarity to that model's units, so
# merging N identical models gives back clusters of one unit per model instead of letting
# same-model pairs win against the discounted third copy.
# Masks are -inf entries, so they spread through the min of merged rows, as in ZipIt. A budget
# of 0 masks the model from the start (ZipIt's code lets one such merge through). If the masks
# leave no admissible pair before the target, the budgets are lifted (see _zip). The input is
# symmetrised as (C + C^T) / 2 (exact for a symmetric C); ties go to the pair with the lowest
# flat index (r, c), r < c, as np.argmax over the matrix does.


def _symmetrized(C):
    """(C + C^T) / 2 with a -inf diagonal; blocked: a plain C + C.T is cache-hostile."""
    m, B = C.shape[0], 64
    S = C.copy()
    buf = np.empty((B, B))
    for i in range(0, m, B):
        for j in range(i, m, B):
            upper, lower = S[i:i + B, j:j + B], S[j:j + B, i:i + B]
            blk = buf[:upper.shape[0], :upper.shape[1]]
            np.add(upper, lower.T, out=blk)
            blk *= 0.5
            upper[...] = blk
            lower[...] = blk.T
    if not np.isfinite(S.sum()):
        raise ValueError("zip: similarity contains nan or inf (or overflows)")
    np.fill_diagonal(S, _NEG)
    return S


def _merge_into(S, p, q, alive, a, counts):
    """Merged similarity row of cluster p after absorbing q (alive[q] already False);
    ``counts`` (clusters x models) counts each cluster's units per model, updated here."""
    counts[p] += counts[q]
    if a > 0:
        row = np.minimum(S[p], S[q])
        if a != 1.0:
            if counts[p].max() >= 2 or counts[p].min() > 0:  # a duplicate, or every model: all pairs
                row *= a
            else:  # discount the clusters that share a model with p or hold a duplicate
                dup = (counts[:, counts[p] > 0] > 0).any(axis=1)
                dup |= counts.max(axis=1) >= 2
                row[dup] *= a
        row[~alive] = _NEG
    else:  # a <= 0: the merged cluster may not merge again
        row = np.full(S.shape[0], _NEG)
    row[p] = _NEG
    S[p] = row
    S[:, p] = row


def _mask_model(S, t, n, alive):
    live = np.flatnonzero(alive[t * n:(t + 1) * n]) + t * n
    S[np.ix_(live, live)] = _NEG


class _Progress:
    """Merges so far, shared by the greedy phases: cluster r's members have root r."""

    def __init__(self, m, n, n_models):
        self.n, self.n_models = n, n_models
        self.alive = np.ones(m, dtype=bool)
        self.parent = np.arange(m)
        self.counts = np.zeros((m, n_models), dtype=np.int32)  # units per model of each cluster
        self.counts[np.arange(m), np.arange(m) // n] = 1
        self.merges: list[tuple[int, int]] = []
        self.masked = False  # whether any budget mask was applied

    def merge(self, p, q):
        self.alive[q] = False
        self.parent[q] = p
        self.merges.append((p, q))

    def labels(self) -> np.ndarray:
        root = self.parent.copy()
        while True:  # pointer jumping; parent[q] < q, so this terminates
            nxt = root[root]
            if np.array_equal(nxt, root):
                break
            root = nxt
        _, labels = np.unique(root, return_inverse=True)  # ordered by smallest member
        return labels.astype(np.int64)


def _zip(C, n_models, target, a, b, greedy):
    """Run ``greedy`` with budgets; if it gets stuck, lift the budget masks and finish."""
    C = np.asarray(C, dtype=np.float64)
    n = units_per_model(C, n_models)
    m = C.shape[0]
    target = n if target is None else int(target)
    if not 1 <= target <= m:
        raise ValueError(f"zip target {target} outside [1, {m}]")
    budget = int(b * (m - target) / n_models + 1e-9)
    S = _symmetrized(C)
    prog = _Progress(m, n, n_models)
    if budget <= 0:
        prog.masked = True
        for t in range(n_models):
            S[t * n:(t + 1) * n, t * n:(t + 1) * n] = _NEG
    greedy(S, prog, budget, a, m - target)
    if len(prog.merges) < m - target and prog.masked:
        # The -inf budget masks spread through the min of merged rows and can leave no
        # admissible pair (N > 2, small b); ZipIt's argmax then merges garbage. Recompute the
        # similarities of the same merges without masks and finish without budgets.
        logger.warning("zip: same-model budgets exhausted every pair after %d of %d merges; "
                       "finishing without budgets", len(prog.merges), m - target)
        del S
        S = _symmetrized(C)
        replay = np.ones(m, dtype=bool)
        counts = np.zeros_like(prog.counts)
        counts[np.arange(m), np.arange(m) // n] = 1
        for p, q in prog.merges:
            replay[q] = False
            _merge_into(S, p, q, replay, a, counts)
        S[~prog.alive] = _NEG
        S[:, ~prog.alive] = _NEG
        greedy(S, prog, None, a, m - target - len(prog.merges))
    if len(prog.merges) < m - target:
        raise ValueError(f"zip: no mergeable pair left after {len(prog.merges)} of "
                         f"{m - target} merges (a <= 0 forbids re-merging); raise target or a")
    return prog.labels()


def _greedy_reference(S, prog, budget, a, n_merges):
    m, n = S.shape[0], prog.n
    spent = np.zeros(prog.n_models, dtype=np.int64)
    for _ in range(n_merges):
        p, q = divmod(int(np.argmax(S)), m)  # S symmetric: first maximum has p < q
        if S[p, q] == _NEG:
            return
        prog.merge(p, q)
        _merge_into(S, p, q, prog.alive, a, prog.counts)
        S[q] = _NEG
        S[:, q] = _NEG
        if budget is not None and p // n == q // n:
            spent[p // n] += 1
            if spent[p // n] >= budget:
                _mask_model(S, p // n, n, prog.alive)
                prog.masked = True


def zip_match_reference(C: np.ndarray, n_models: int, target: int | None = None,
                        a: float = 0.5, b: float = 1.0) -> np.ndarray:
    """ZipIt greedy, naive O(n^3) loop (argmax over the whole matrix per merge).

    >>> C = np.array([[1., .2, .9, .1], [.2, 1., .1, .8], [.9, .1, 1., .3], [.1, .8, .3, 1.]])
    >>> zip_match_reference(C, 2).tolist()
    [0, 1, 0, 1]
    """
    return _zip(C, n_models, target, a, b, _greedy_reference)


# Chunk sizes of a row's sorted candidate list: the first chunk after a row is (re)built is its
# argmax; each exhausted chunk is refilled with the next, larger one (None: all the rest), so a
# row costs at most len(_CHUNKS) O(m log m) passes per build, O(m^2 log m) overall, even when
# every row's favourite partners keep being merged away (a dominant shared factor in C).
_CHUNKS = (1, 16, 256, None)
_BATCH_ELEMS = 1 << 21  # rows refilled together: bounds the (rows, m) temporaries to ~16 MB


def _order_desc(vals):
    """Indices sorting vals in decreasing order, equal values in index order."""
    order = np.argsort(-vals)
    s = vals[order]
    if (s[1:] == s[:-1]).any():  # the fast sort is not stable: redo it stably on ties
        order = np.argsort(-vals, kind="stable")
    return order


class _FastZip:
    """Lazy-invalidation greedy on the same S as the reference loop.

    Each live row r keeps a chunk of candidate partners sorted by (value desc, column) and a
    head. A candidate (r, c) read at step f is valid iff c is alive, c has not been rebuilt
    since f and the pair is not budget-masked. Of the two rows of a pair, the one rebuilt last
    still holds a valid entry for it, so the best valid head is the global best pair. A head
    gone stale keeps its value as an upper bound of its row, so rows are only advanced when
    they reach the top: O(m) vector work per merge plus amortised chunk refills.
    """

    def __init__(self, S, prog, budget, a):
        m = S.shape[0]
        self.S, self.prog, self.n, self.a, self.budget, self.m = S, prog, prog.n, a, budget, m
        self.idx = np.arange(m)
        self.model = self.idx // prog.n
        self.alive = prog.alive
        self.ver = np.zeros(m, dtype=np.int64)      # step at which a cluster last changed
        self.ctime = np.zeros(m, dtype=np.int64)    # step at which a row's chunk was read
        self.level = np.ones(m, dtype=np.int64)     # index into _CHUNKS of the next chunk
        self.spent = np.zeros(prog.n_models, dtype=np.int64)
        self.masked = np.full(prog.n_models, budget is not None and budget <= 0)
        self.step = 0
        self.hc = np.argmax(S, axis=1)              # first chunk: the row's best, lowest col
        self.hv = S[self.idx, self.hc]
        self.thr_v = self.hv.copy()                 # key (value, col) of a chunk's last entry
        self.thr_c = self.hc.copy()
        self.pool = self.hc.astype(np.int32)        # all chunks, back to back
        self.ptr = self.idx.copy()
        self.pend = self.idx + 1
        self.used = m
        empty = self.hv == _NEG                     # dead rows of S are all -inf
        self.hc[empty] = -1
        self.ptr[empty] = self.pend[empty]

    def _reserve(self, k):
        if self.used + k <= self.pool.size:
            return
        live = np.flatnonzero(self.alive & (self.pend > self.ptr))
        lens = self.pend[live] - self.ptr[live]
        total = int(lens.sum())
        pool = np.empty(max(2 * (total + k), 1024), dtype=np.int32)
        at = 0
        for r, size in zip(live.tolist(), lens.tolist()):
            pool[at:at + size] = self.pool[self.ptr[r]:self.pend[r]]
            self.ptr[r], self.pend[r] = at, at + size
            at += size
        self.pool, self.used = pool, total

    def _store(self, rows, cols, counts):
        """Append the chunks (concatenated in row order) as the rows' current chunks."""
        self.ptr[rows] = self.pend[rows] = 0
        self._reserve(cols.size)
        ends = self.used + np.cumsum(counts)
        self.pool[self.used:self.used + cols.size] = cols
        self.ptr[rows], self.pend[rows] = ends - counts, ends
        self.used += cols.size

    def _refill(self, rows):
        """Next chunk of each row: live candidates whose key comes after the last chunk's."""
        # a row whose last chunk held all its candidates owns no valid pair any more: it stays
        # empty until rebuilt, which bounds the refills per row by len(_CHUNKS)
        rows = rows[self.level[rows] < len(_CHUNKS)]
        self.ctime[rows] = self.step
        levels = self.level[rows]
        self.level[rows] += 1
        batch = max(1, _BATCH_ELEMS // self.m)
        for lv in np.unique(levels):
            same = rows[levels == lv]
            if same.size <= 4:  # a batch's (rows, m) temporaries cost more than a loop
                for r in same:
                    self._refill_one(int(r), _CHUNKS[lv])
                continue
            for s in range(0, same.size, batch):
                self._refill_batch(same[s:s + batch], _CHUNKS[lv])

    def _refill_one(self, r, size):
        v = self.S[r]
        tv, tc = self.thr_v[r], self.thr_c[r]
        cand = v < tv
        cand &= self.alive
        w = np.where(cand, v, _NEG)
        if np.isfinite(tv):  # ties with the threshold come after it in column order
            eq = np.flatnonzero(v == tv)
            eq = eq[(eq > tc) & self.alive[eq]]
            w[eq] = tv
        if size is not None and size < self.m:
            kth = w[np.argpartition(w, self.m - size)[self.m - size]]
            cols = np.flatnonzero(w >= kth)  # keeps ties at the boundary
        else:
            cols = np.arange(self.m)
        vals = w[cols]
        real = vals != _NEG
        if not real.all():
            cols, vals = cols[real], vals[real]
        order = _order_desc(vals)
        cols = cols[order]
        if cols.size:
            self.thr_v[r], self.thr_c[r] = vals[order[-1]], cols[-1]
        self._store(np.array([r]), cols, np.array([cols.size]))

    def _refill_batch(self, R, size):
        V = self.S[R]
        tv, tc = self.thr_v[R][:, None], self.thr_c[R][:, None]
        cand = V < tv
        cand |= (V == tv) & (self.idx > tc)
        cand &= self.alive
        cand &= V != _NEG
        Vc = np.where(cand, V, _NEG)
        counts = cand.sum(1)
        if size is None or size >= self.m:
            order = np.argsort(-Vc, axis=1)
            first = np.arange(self.m) < counts[:, None]
            s = np.take_along_axis(Vc, order, axis=1)
            if (first[:, 1:] & (s[:, 1:] == s[:, :-1])).any():
                order = np.argsort(-Vc, axis=1, kind="stable")
            cols = order[first]
        else:
            kth = Vc.max(1) if size == 1 else np.partition(Vc, self.m - size, axis=1)[:, -size]
            cand &= V >= kth[:, None]  # keeps ties at the boundary
            counts = cand.sum(1)
            rr, cols = np.nonzero(cand)
            order = np.argsort(-V[rr, cols], kind="stable")
            cols = cols[order[np.argsort(rr[order], kind="stable")]]
        ends = np.cumsum(counts)
        full = counts > 0
        self.thr_c[R[full]] = cols[ends[full] - 1]
        self.thr_v[R[full]] = self.S[R[full], self.thr_c[R[full]]]
        self._store(R, cols, counts)

    def _valid_head(self, rows):
        """Scalar scan of a few rows' next candidates; returns the rows still unsettled."""
        left = []
        for r in rows.tolist():
            ptr, pend = int(self.ptr[r]), int(self.pend[r])
            stop, ct, mr = min(pend, ptr + 4), self.ctime[r], self.model[r]
            own_masked = self.masked[mr]
            while ptr < stop:
                c = int(self.pool[ptr])
                if (self.alive[c] and self.ver[c] <= ct
                        and not (own_masked and self.model[c] == mr)):
                    break
                ptr += 1
            self.ptr[r] = ptr
            if ptr < stop:
                self.hc[r], self.hv[r] = c, self.S[r, c]
            else:
                left.append(r)
        return np.array(left, dtype=np.int64)

    def _settle(self, rows):
        """Move each row's head to its first valid candidate, refilling chunks as needed."""
        if rows.size <= 8:  # the usual case: a loop beats a dozen numpy calls
            rows = self._valid_head(rows)
        width = 4
        while rows.size:
            exhausted = self.ptr[rows] >= self.pend[rows]
            if exhausted.any():
                self._refill(rows[exhausted])
                empty = self.ptr[rows] >= self.pend[rows]
                self.hv[rows[empty]] = _NEG
                self.hc[rows[empty]] = -1
                rows = rows[~empty]
            ptr, pend = self.ptr[rows][:, None], self.pend[rows][:, None]
            pos = ptr + np.arange(width)
            c = self.pool[np.minimum(pos, pend - 1)].astype(np.int64)
            mr = self.model[rows][:, None]
            ok = pos < pend
            ok &= self.alive[c]
            ok &= self.ver[c] <= self.ctime[rows][:, None]
            ok &= ~(self.masked[mr] & (self.model[c] == mr))
            found = ok.any(1)
            first = ok.argmax(1)
            good = rows[found]
            self.ptr[good] = pos[found, first[found]]
            self.hc[good] = c[found, first[found]]
            self.hv[good] = self.S[good, self.hc[good]]
            rows = rows[~found]
            self.ptr[rows] = np.minimum(self.ptr[rows] + width, self.pend[rows])
            width = min(4 * width, 4096)

    def _restart_row(self, p):
        """p's row was just rebuilt: its first chunk is its argmax (S[p] is -inf off-limits)."""
        c = int(np.argmax(self.S[p]))
        v = self.S[p, c]
        self.level[p], self.ctime[p] = 1, self.step
        if v == _NEG:
            self.ptr[p] = self.pend[p] = 0
            self.hv[p], self.hc[p] = _NEG, -1
            return
        self.thr_v[p], self.thr_c[p] = v, c
        self.ptr[p] = self.pend[p] = 0
        self._reserve(1)
        self.pool[self.used] = c
        self.ptr[p], self.pend[p] = self.used, self.used + 1
        self.used += 1
        self.hv[p], self.hc[p] = v, c

    def _valid(self, rows):
        c = self.hc[rows]
        mr = self.model[rows]
        ok = self.alive[c] & (self.ver[c] <= self.ctime[rows])
        ok &= ~(self.masked[mr] & (self.model[c] == mr))
        return ok

    def _best_pair(self):
        """Best valid head. A stale head's value still bounds its row from above (chunks are
        sorted), so only stale rows that reach the top are settled, the top k at a time."""
        hv, k = self.hv, 8
        while True:
            vmax = hv[hv.argmax()]
            if vmax == _NEG:
                return None
            rows = np.flatnonzero(hv == vmax)  # usually the two ends of one pair
            ok = self._valid(rows)
            if ok.all():
                break
            top = rows[~ok]
            if rows.size < k:
                near = np.argpartition(hv, self.m - k)[self.m - k:] if k < self.m else self.idx
                top = np.union1d(top, near)
                top = top[hv[top] != _NEG]  # dead and empty rows have nothing to settle
                top = top[~self._valid(top)]
            self._settle(top)
            k *= 4
        if rows.size <= 8:
            return min((min(r, c), max(r, c)) for r, c in zip(rows.tolist(),
                                                                self.hc[rows].tolist()))
        lo = np.minimum(rows, self.hc[rows])
        hi = np.maximum(rows, self.hc[rows])
        i = np.lexsort((hi, lo))[0]
        return int(lo[i]), int(hi[i])

    def run(self, n_merges):
        for step in range(1, n_merges + 1):
            pair = self._best_pair()
            if pair is None:
                return
            p, q = pair
            self.step = step
            self.prog.merge(p, q)
            self.ver[p] = step  # every head pointing at p or q is stale from now on
            self.hv[q], self.hc[q] = _NEG, -1
            _merge_into(self.S, p, q, self.alive, self.a, self.prog.counts)
            t = p // self.n
            if self.budget is not None and t == q // self.n:
                self.spent[t] += 1
                if self.spent[t] >= self.budget and not self.masked[t]:
                    _mask_model(self.S, t, self.n, self.alive)
                    self.masked[t] = self.prog.masked = True
            self._restart_row(p)


def zip_match_fast(C: np.ndarray, n_models: int, target: int | None = None,
                   a: float = 0.5, b: float = 1.0) -> np.ndarray:
    """:func:`zip_match_reference`'s labels in O(n^2 log n) (lazy invalidation, see _FastZip)."""
    return _zip(C, n_models, target, a, b,
                lambda S, prog, budget, a, k: _FastZip(S, prog, budget, a).run(k))


# Below this many stacked units the naive loop's vectorised argmax beats the lazy greedy's
# bookkeeping (measured: 4-5x faster at 2 x 32..128 units, even at 2 x 256, 1.6x slower at 2 x 512).
_SMALL = 600


def zip_match(C: np.ndarray, n_models: int, target: int | None = None,
              a: float = 0.5, b: float = 1.0) -> np.ndarray:
    """ZipIt greedy clustering of the N n stacked units into ``target`` (default n) clusters.

    Labels are numbered in order of each cluster's smallest member; a cluster's model is that
    member's model (see the notes above ``_symmetrized`` for budgets, masks and ties). Small
    problems run the naive loop, large ones :func:`zip_match_fast`: the same labels.

    >>> C = np.array([[1., .2, .9, .1], [.2, 1., .1, .8], [.9, .1, 1., .3], [.1, .8, .3, 1.]])
    >>> zip_match(C, 2).tolist()
    [0, 1, 0, 1]
    """
    small = np.asarray(C).shape[0] <= _SMALL
    return (zip_match_reference if small else zip_match_fast)(C, n_models, target, a, b)
