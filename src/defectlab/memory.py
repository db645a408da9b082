"""Shared memory-bank machinery: patch aggregation, coreset sampling, nearest-neighbour search,
and turning patch scores into pixel maps.

Used by PatchCore, APC (PatchCore on fine-tuned features), DS2-GDE and multi-scale patch SVDD.
Everything is batched matrix work; loops run over chunks, never over individual points
(except the greedy coreset's one argmax per selected point).
"""

from __future__ import annotations

import bisect
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F


def local_patch_features(maps: list[torch.Tensor], *, patch_size: int = 3, out_dim: int | None = None,
                         include_pad: bool = True) -> torch.Tensor:
    """PatchCore's locally aware patch features.

    Each feature map (B, C_l, H_l, W_l) is average-pooled over a ``patch_size`` neighbourhood
    (stride 1, so the resolution is kept; ``include_pad``: border patches average the zero padding
    in, as the reference implementation's zero-padded unfold + mean does, else only the cells
    inside the map), resized to the first map's resolution, concatenated
    along channels and, if ``out_dim`` is given, reduced to ``out_dim`` channels by adaptive
    average pooling over the channel axis. Returns (B, H_0, W_0, D).
    """
    h0, w0 = maps[0].shape[-2:]
    pooled = []
    for fmap in maps:
        # channels-last: pooling and resizing vectorise over channels (~5x faster on CPU), and the
        # (B, H, W, C) result below is then a free view instead of a transposing copy
        fmap = fmap.contiguous(memory_format=torch.channels_last)
        fmap = F.avg_pool2d(fmap, patch_size, stride=1, padding=patch_size // 2,
                            count_include_pad=include_pad) if patch_size > 1 else fmap
        if fmap.shape[-2:] != (h0, w0):
            fmap = F.interpolate(fmap, size=(h0, w0), mode="bilinear", align_corners=False)
        pooled.append(fmap.permute(0, 2, 3, 1))
    feats = torch.cat(pooled, dim=-1)  # B, H, W, C
    if out_dim is not None and out_dim < feats.shape[-1]:
        b, h, w, c = feats.shape
        feats = F.adaptive_avg_pool1d(feats.reshape(-1, 1, c), out_dim).reshape(b, h, w, out_dim)
    return feats.contiguous()


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (|a|² - 2ab + |b|²), clamped at 0."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_min_(0)


def min_sq_dists(x: torch.Tensor, x_sq: torch.Tensor, others: torch.Tensor, chunk: int = 1024,
                 rows: int = 65536, others_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Squared distance of each row of ``x`` to its nearest row of ``others``, in bounded memory
    (``others_sq``: the rows' squared norms, when the caller keeps them)."""
    out = torch.full((x.shape[0],), float("inf"), device=x.device)
    for j in range(0, others.shape[0], chunk):
        c = others[j:j + chunk].to(x.device, x.dtype)
        c_sq = ((c * c).sum(1) if others_sq is None else others_sq[j:j + chunk].to(x.device, x.dtype))[None]
        for i in range(0, x.shape[0], rows):
            # min_j |x - c_j|² = |x|² + min_j (|c_j|² - 2 x·c_j): one fused product and one plain
            # reduction over the (rows × chunk) block, instead of five passes and an arg-minimum
            part = torch.addmm(c_sq, x[i:i + rows], c.T, alpha=-2).amin(1).add_(x_sq[i:i + rows]).clamp_min_(0)
            torch.minimum(out[i:i + rows], part, out=out[i:i + rows])
    return out


def greedy_coreset(features: torch.Tensor, n: int, *, proj_dim: int | None = 128, n_starts: int = 1,
                   seed: int = 0, batch: int = 1, candidates: int = 4, precision: str = "float32",
                   prune: bool = True, prune_margin: float = 0.9, covered: torch.Tensor | None = None,
                   min_d: torch.Tensor | None = None, n_covered: int = 0, return_state: bool = False):
    """Indices of an (approximate) greedy k-center coreset of ``features`` (N, D): ``n`` distinct
    rows, or fewer when only duplicates of the picks (distance 0) are left.

    ``covered`` (M, D): points already in the coreset (an existing memory bank, in the same space
    as ``features``). The greedy then continues from them: the first pick is the point of
    ``features`` farthest from ``covered``, and so on; no random start.

    As in PatchCore: features are first reduced by a Gaussian random projection to ``proj_dim``
    (Johnson–Lindenstrauss) when that is smaller than D, then points are selected one at a time,
    each the point farthest from the current coreset; ``proj_dim=None`` keeps the original space.

    ``batch = 1`` is the textbook greedy loop: one (N × d) distance update per selected point, a
    matrix-vector product that is memory-bound. ``batch = B > 1`` selects B points per round: the
    ``candidates·B`` points farthest from the coreset are taken, the exact greedy rule is run among
    them (their distances to each new pick are updated from a small C × C matrix), and the distances
    of all N points to the B picks are then updated with one (N × d) @ (d × B) matrix product —
    compute-bound BLAS-3 work, an order of magnitude faster per point. A round stops early when a
    candidate's distance falls below the largest distance outside the candidate set, so every pick
    is exactly the one the one-at-a-time greedy would make (up to ties): same result, fewer passes.

    ``prune=True`` skips the distance updates of points that can no longer be picked. The greedy
    radius (the distance of each new pick to the coreset) only shrinks, and it shrinks like a power
    of the coreset size, so its final value is extrapolated from its history; points already closer
    to the coreset than ``prune_margin`` × that estimate are dropped from the update. Exactness does
    not rest on the estimate: should the radius ever fall below the drop threshold, the dropped
    points are brought up to date and put back before the next pick, so the picks are the same as
    without pruning (up to ties). Roughly half the update work is saved on patch features.

    ``min_d`` (N,): instead of ``covered``, each row's exact squared distance to a coreset of
    ``n_covered`` points already chosen (what ``return_state`` gave for the same rows): the greedy
    goes on from there without recomputing any distance. ``return_state=True`` returns ``(indices,
    radii², min_d)``: each pick's squared distance to the coreset when it was picked (its greedy
    radius; inf for a random start) and every row's exact squared distance to the final coreset
    (rows dropped by ``prune`` are brought up to date first).

    ``precision="bfloat16"`` runs that (N × d) @ (d × B) update in bfloat16 (about 2× faster on
    CPUs with AVX512-BF16/AMX and on GPUs; distances carry ~1 % relative error, so picks are
    approximate — ``defectlab bench`` reports the resulting AUROC against exact greedy).
    """
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
    num, dim = features.shape
    n = int(min(max(n, 1), num))
    x = features.float()
    proj = random_projection(dim, proj_dim, seed).to(x.device) if proj_dim is not None and proj_dim < dim else None
    if proj is not None:
        x = x @ proj
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = x.contiguous()
    x_sq = (x * x).sum(1)
    # squared distances this small are duplicates: |a|² - 2a·b + |b|² in float32 leaves ~1e-6·|x|²
    # of rounding where a = b
    dup = 1e-5 * float(x_sq.max()) if num else 0.0
    radii2: list[float] = []                         # each pick's squared distance to the coreset when picked
    if min_d is not None:
        min_d = min_d.to(x.device, torch.float32).clone()
        selected: list[int] = []
        n_cov = int(n_covered)
    elif covered is not None and len(covered):
        c = covered.float().to(x.device)
        min_d = min_sq_dists(x, x_sq, c @ proj if proj is not None else c)
        selected = []
        n_cov = len(c)
    else:
        n_cov = 0
        start = torch.randint(num, (n_starts,), generator=gen).tolist()
        min_d = torch.full((num,), float("inf"), device=x.device)
        for s in start:
            min_d = torch.minimum(min_d, (x_sq - 2 * x @ x[s] + x_sq[s]).clamp_min_(0))
        selected = [start[0]]
        radii2.append(float("inf"))
        min_d[start[0]] = 0
    lp = torch.bfloat16 if precision == "bfloat16" else torch.float32
    # the active set: rows whose distance to the coreset is still updated (all of them at first)
    act = _ActiveSet(x, x_sq, min_d, lp)
    radius = _RadiusHistory()
    while len(selected) < n:
        b = min(batch, n - len(selected))
        c = min(len(act), candidates * b + 1) if b > 1 else 1
        top_d, top = torch.topk(act.min_d, c)
        r2 = float(top_d[0])
        if act.tau > 0 and r2 < act.tau:            # a dropped point might now be the farthest
            act.revive(x, x_sq, selected)
            prune_margin *= 0.9                      # be more careful from now on
            continue
        if r2 <= dup:                                # every point left duplicates a pick: none to add
            break
        radius.add(n_cov + len(selected), r2)
        if b == 1:
            picks_local = [int(top[0])]
            radii2.append(r2)
        else:
            # a point outside the candidates is at most this far from the coreset (distances only
            # shrink; dropped points are at most act.tau away)
            bound = max(float(top_d[-1]) if c < len(act) else -1.0, act.tau)
            cand_d, cand = (top_d[:-1], top[:-1]) if c < len(act) else (top_d, top)
            xc = act.x[cand]
            dcc = (act.x_sq[cand][:, None] - 2 * xc @ xc.T + act.x_sq[cand][None]).clamp_min_(0).cpu().numpy()
            cur = cand_d.cpu().numpy().copy()
            picks_pos = []
            for _ in range(b):
                k = int(np.argmax(cur))
                # stop the round once a non-candidate could be farther: every pick is the one the
                # one-at-a-time greedy would make (up to ties)
                if cur[k] <= dup or (picks_pos and cur[k] < bound):
                    break
                picks_pos.append(k)
                radii2.append(float(cur[k]))
                np.minimum(cur, dcc[k], out=cur)
            if not picks_pos:
                break
            picks_local = cand[torch.as_tensor(picks_pos, device=cand.device)].tolist()
        selected += act.update(picks_local)
        if prune and len(selected) < n:
            tau = max(act.tau, prune_margin**2 * radius.extrapolate(n_cov + n))
            # (never drop the current farthest point: a threshold above it means the estimate is off)
            if 0 < tau < float(act.min_d.max()) and int((act.min_d <= tau).sum()) > len(act) // 8:
                act.drop(tau, len(selected))
    picked = torch.tensor(selected[:n], dtype=torch.long)
    if not return_state:
        return picked
    if act.dropped:
        act.revive(x, x_sq, selected)                # every row's distance exact, in row order
    return picked, torch.tensor(radii2[:n]), act.min_d


class _RadiusHistory:
    """The greedy radius² at each round, and its power-law extrapolation to the final coreset size."""

    def __init__(self):
        self.t: list[int] = []
        self.r2: list[float] = []

    def add(self, t: int, r2: float) -> None:
        self.t.append(t)
        self.r2.append(r2)

    def extrapolate(self, n: int) -> float:
        """r²(n) from r² ≈ a·t^s fitted on the last point and the one at half its coreset size;
        0 (no estimate) before 64 picks or while the radius is not yet decreasing."""
        t = self.t[-1]
        if t < 64:
            return 0.0
        i = bisect.bisect_left(self.t, t // 2)
        t0, r0, r1 = self.t[i], self.r2[i], self.r2[-1]
        if not (0 < r1 < r0) or t0 >= t:
            return 0.0
        s = math.log(r1 / r0) / math.log(t / t0)
        return r1 * (n / t) ** s


class _ActiveSet:
    """The rows greedy_coreset still updates: their vectors, squared norms, distances to the
    coreset (``min_d``) and original indices; rows closer than ``tau`` are dropped and kept aside
    with the coreset size at which they were dropped, so they can be brought up to date."""

    def __init__(self, x, x_sq, min_d, lp):
        self.lp = lp
        self._set(x, x_sq, min_d, None)
        self.tau = 0.0
        self.dropped: list[tuple[torch.Tensor, torch.Tensor, int]] = []   # (ids, stale min_d, picks so far)

    def _set(self, x, x_sq, min_d, ids):
        self.x, self.x_sq, self.min_d, self.ids = x, x_sq, min_d, ids
        self.x_lp, self.x_sq_lp = (x, x_sq) if self.lp == torch.float32 else (x.to(self.lp), x_sq.to(self.lp))

    def __len__(self) -> int:
        return len(self.min_d)

    def update(self, picks_local: list[int]) -> list[int]:
        """Lower every active distance by the picks; return the picks' original indices."""
        p = torch.as_tensor(picks_local, device=self.x.device)
        # min_j |x - p_j|² = |x|² + min_j (|p_j|² - 2 x·p_j): one fused matrix product, one reduction
        part = torch.addmm(self.x_sq_lp[p][None], self.x_lp, self.x_lp[p].T, alpha=-2)
        torch.minimum(self.min_d, part.amin(1).float().add_(self.x_sq).clamp_min_(0), out=self.min_d)
        return picks_local if self.ids is None else self.ids[p].tolist()

    def drop(self, tau: float, n_selected: int) -> None:
        keep = self.min_d > tau
        ids = torch.arange(len(self), device=self.x.device) if self.ids is None else self.ids
        self.dropped.append((ids[~keep], self.min_d[~keep], n_selected))
        self._set(self.x[keep], self.x_sq[keep], self.min_d[keep], ids[keep])
        self.tau = tau

    def revive(self, x, x_sq, selected: list[int], chunk: int = 256) -> None:
        """Bring the dropped rows' distances up to date with the picks made since they were
        dropped, and make every row active again."""
        ids = [self.ids] + [d[0] for d in self.dropped]
        min_d = [self.min_d]
        for rows, stale, since in self.dropped:
            xr, xr_sq = x[rows], x_sq[rows]
            for s in range(since, len(selected), chunk):
                p = torch.as_tensor(selected[s:s + chunk], device=x.device)
                part = torch.addmm(x_sq[p][None], xr, x[p].T, alpha=-2).amin(1).add_(xr_sq).clamp_min_(0)
                stale = torch.minimum(stale, part)
            min_d.append(stale)
        ids, min_d = torch.cat(ids), torch.cat(min_d)
        order = torch.argsort(ids)                   # back to the original row order
        self._set(x, x_sq, min_d[order], None)
        self.tau, self.dropped = 0.0, []


#: ``coreset: chunked``: default rows per chunk (``scripts/bench_coreset_scaling.py``: at a 10 %
#: ratio the selection then costs at most about one feature pass, at any N)
CORESET_CHUNK = 16384
#: ``coreset: auto``: exact greedy up to this many rows (there it costs at most ~2.5x the feature
#: pass at 10 %, scripts/bench_coreset_scaling.py), chunked above (~1.8x at any size)
CORESET_EXACT_MAX = 262144


def chunked_coreset(features: torch.Tensor, n: int, *, chunk: int = CORESET_CHUNK, seed: int = 0,
                    proj_dim: int | None = 128, covered: torch.Tensor | None = None, partition: str = "kmeans",
                    rounds: int = 8, **greedy_kw) -> torch.Tensor:
    """Indices of a greedy k-center coreset of ``features`` (N, D) chosen chunk by chunk, at a cost
    linear in N.

    Up to ``chunk`` rows this is ``greedy_coreset`` itself (same picks for the same seed). Above,
    the rows are split into ``ceil(N / chunk)`` chunks and ``greedy_coreset`` runs on each chunk
    alone. Exact greedy costs ~N·n·d, quadratic in N at a fixed coreset ratio; here each chunk
    costs ~chunk·(n·chunk/N)·d, so the whole costs ~n·chunk·d: linear in N at a fixed ratio.

    ``partition="kmeans"`` (default): the chunks are k-means cells of the (projected) features (a
    cell over 2 × ``chunk`` rows is split at random), so each chunk is one region of feature space
    and the picks of different chunks do not duplicate each other. Each cell starts with its share
    of ``n`` proportional to its size; every pick's greedy radius (its distance to the cell's
    earlier picks) is recorded, and the ``n`` picks with the largest radii over all cells are kept:
    were the cells independent, exactly the global greedy's picks. A cell all of whose picks are
    kept may deserve more (a spread-out region needs more of the bank than a tight one of the same
    size), so its greedy continues, doubling its picks, for up to ``rounds`` rounds, until the
    kept set stops changing. ``partition="random"``: rows shuffled (seeded) into chunks of
    near-equal size, each with a share proportional to its size, no merge: every chunk is a sample
    of the whole data, so the picks of different chunks partly duplicate each other.

    ``covered`` (M, D): an existing coreset to continue from (each chunk's greedy starts from it,
    as ``greedy_coreset(covered=...)``). The random projection (``proj_dim``) is made once for all
    chunks; other keywords go to ``greedy_coreset``.
    """
    num, dim = features.shape
    n = int(min(max(n, 1), num))
    if chunk < 1:
        raise ValueError(f"coreset chunk must be >= 1 row, got {chunk}")
    if partition not in ("kmeans", "random"):
        raise ValueError(f"coreset partition must be kmeans or random, got {partition!r}")
    if num <= chunk:
        return greedy_coreset(features, n, proj_dim=proj_dim, seed=seed, covered=covered, **greedy_kw)
    x = features.float()
    if proj_dim is not None and proj_dim < dim:
        proj = random_projection(dim, proj_dim, seed).to(x.device)
        x = x @ proj
        covered = covered.float().to(x.device) @ proj if covered is not None and len(covered) else covered
    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    if partition == "random":
        m = -(-num // chunk)
        perm = torch.randperm(num, generator=gen)
        bounds = [num * i // m for i in range(m + 1)]
        parts = [perm[bounds[i]:bounds[i + 1]] for i in range(m)]
    else:
        parts = _kmeans_cells(x, -(-num // chunk), chunk, seed, gen)
    sizes = np.array([len(p) for p in parts])
    # each chunk's share of n: proportional to its size, remainders to the largest fractions
    share = sizes * n / num
    quota = np.floor(share).astype(int)
    quota[np.argsort(-(share - quota), kind="stable")[:n - int(quota.sum())]] += 1
    picks: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(parts)   # local rows, in pick order
    radii: list[torch.Tensor] = [torch.empty(0)] * len(parts)
    dist: list[torch.Tensor | None] = [None] * len(parts)    # each cell's rows' squared distances to its coreset
    n_cov = len(covered) if covered is not None else 0

    def extend(i: int, k: int) -> None:
        """k more greedy picks in cell i, going on from its picks so far (and ``covered``) with the
        distances its last greedy left, so nothing is recomputed."""
        part = x[parts[i].to(x.device)]
        if partition == "random":                          # no merge: neither radii nor a resume needed
            picks[i] = greedy_coreset(part, k, proj_dim=None, seed=seed + i, covered=covered, **greedy_kw).cpu()
            return
        resume = {} if dist[i] is None else {"min_d": dist[i], "n_covered": n_cov + len(picks[i])}
        sel, r2, dist[i] = greedy_coreset(part, k, proj_dim=None, seed=seed + i, covered=covered, return_state=True,
                                          **resume, **greedy_kw)
        radii[i] = torch.cat([radii[i], r2.sqrt()])
        picks[i] = torch.cat([picks[i], sel.cpu()])

    for i in range(len(parts)):
        if quota[i]:
            extend(i, int(quota[i]))
    if partition == "random":
        return torch.cat([parts[i][picks[i]] for i in range(len(parts))])
    for _ in range(rounds):
        r = torch.cat(radii)
        if len(r) < n:                                       # duplicates: a greedy stopped short
            break
        cut = float(torch.topk(r, n).values[-1])            # the smallest radius still kept
        hungry = [i for i in range(len(parts)) if len(picks[i]) and len(picks[i]) < sizes[i]
                  and float(radii[i][-1]) > cut]
        if not hungry:
            break
        for i in hungry:                                     # all kept: double its picks
            extend(i, int(min(len(picks[i]), sizes[i] - len(picks[i]))))
    r = torch.cat(radii)
    rows = torch.cat([parts[i][picks[i]] for i in range(len(parts))])
    return rows[torch.topk(r, min(n, len(r))).indices]       # in merged greedy order


def kmeans_lists(x: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """k-means (faiss, 20 iterations, seeded) of the rows of ``x``: the (k, D) centroids, the row
    indices sorted by their nearest centroid (stable), and how many rows each centroid has."""
    import faiss

    data = x.float().cpu().contiguous().numpy()
    km = faiss.Kmeans(data.shape[1], k, niter=20, seed=seed)
    km.train(data)
    _, assign = km.index.search(data, 1)
    assign = torch.from_numpy(assign[:, 0]).long()
    return (torch.from_numpy(km.centroids).float(), torch.argsort(assign, stable=True),
            torch.bincount(assign, minlength=k).tolist())


def _kmeans_cells(x: torch.Tensor, cells: int, chunk: int, seed: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Row indices of ``x`` per k-means cell (faiss, seeded), cells over 2 × ``chunk`` rows split
    at random into chunks of at most ``chunk``."""
    _, order, counts = kmeans_lists(x, cells, seed)
    parts, start = [], 0
    for c in counts:
        rows = order[start:start + c]
        start += c
        if c > 2 * chunk:
            rows = rows[torch.randperm(c, generator=gen)]
            k = -(-c // chunk)
            parts += [rows[c * j // k:c * (j + 1) // k] for j in range(k)]
        elif c:
            parts.append(rows)
    return parts


def random_projection(dim: int, proj_dim: int, seed: int = 0) -> torch.Tensor:
    """The (dim, proj_dim) Gaussian Johnson–Lindenstrauss projection greedy_coreset uses."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(dim, proj_dim, generator=gen) / math.sqrt(proj_dim)


class FeatureStore:
    """Append-only (N, D) float32 rows kept in RAM up to ``max_ram_mb``, then spilled to a
    temporary file (plain writes, so the pages do not count in the process's RSS); ``gather``
    reads back selected rows. Lets a memory bank be built from more patches than fit in memory."""

    def __init__(self, dim: int, max_ram_mb: float = 1024, dir: str | None = None):
        self.dim, self.max_bytes, self.dir = dim, max_ram_mb * 2**20, dir
        self.chunks: list[torch.Tensor] = []
        self.n, self._file = 0, None

    def append(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float().cpu().contiguous()
        if self._file is None and (self.n + len(rows)) * self.dim * 4 > self.max_bytes:
            import tempfile

            self._file = tempfile.TemporaryFile(dir=self.dir)
            for c in self.chunks:
                self._file.write(c.numpy().tobytes())
            self.chunks = []
        if self._file is not None:
            self._file.write(rows.numpy().tobytes())
        else:
            self.chunks.append(rows)
        self.n += len(rows)

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.cpu()
        if self._file is None:
            return torch.cat(self.chunks)[idx]
        self._file.flush()
        order = torch.argsort(idx)
        out = np.empty((len(idx), self.dim), np.float32)
        row_bytes = self.dim * 4
        for pos, i in zip(order.tolist(), idx[order].tolist()):
            self._file.seek(i * row_bytes)
            out[pos] = np.frombuffer(self._file.read(row_bytes), np.float32)
        return torch.from_numpy(out)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self.chunks = []


def coreset_coverage(features: torch.Tensor, indices: torch.Tensor) -> float:
    """Largest distance from any point to its nearest coreset point (the k-center objective)."""
    d, _ = knn(features, features[indices], k=1)
    return float(d.max())


#: ``approx="auto"``: banks up to this many rows are searched exactly (below it one GEMM over the
#: bank is as fast as an inverted-file search; measured by ``defectlab bench --inference``)
AUTO_EXACT_MAX_ROWS = 4096
#: lists an ``auto`` inverted file probes per query (recall@1 0.98 on PatchCore's smoke patch
#: features, pixel AUROC within 0.03 points of exact search, image scores exact through
#: ``rescore_top``: docs/performance.md)
AUTO_NPROBE = 3


def auto_index_factory(n_rows: int, device: str | torch.device = "cpu") -> str | None:
    """The index ``approx="auto"`` builds for a bank of ``n_rows`` rows, or None (exact search).

    Exact on CUDA (one GEMM per batch is already far below the backbone's forward there) and for
    banks of up to ``AUTO_EXACT_MAX_ROWS`` rows; above, an inverted file of uncompressed vectors
    searched by grouped matrix products (``gemm-IVF<L>``, ``GemmIVF``: distances to the found
    neighbours are exact) with L ≈ 0.8·√N lists, the power of two nearest it (at most N/39, as
    faiss' k-means wants), so a query costs ~(L + nprobe·N/L)·d instead of N·d. (Fewer, longer
    lists than the √(nprobe·N) that minimises that cost: at the same time they find more of the
    true neighbours, docs/performance.md.)"""
    if torch.device(device).type == "cuda" or n_rows <= AUTO_EXACT_MAX_ROWS:
        return None
    lists = min(2 ** round(math.log2(0.8 * math.sqrt(n_rows))), 2 ** int(math.log2(n_rows / 39)))
    return f"gemm-IVF{lists}"


class GemmIVF:
    """An inverted file (k-means lists of uncompressed bank rows) searched with matrix products.

    faiss' ``IVF<L>,Flat`` scans each query's lists one query at a time; here the (query, probed
    list) pairs of a whole batch are grouped by list and each list is scored against all the
    queries that probe it in one ``addmm``, which runs near the CPU's GEMM peak. Same neighbours
    as faiss' IVF with the same lists and probes; found distances are exact (a missed neighbour
    can only overstate a distance, as with any inverted file)."""

    def __init__(self, bank: torch.Tensor, lists: int, nprobe: int, seed: int = 0):
        lists = max(1, min(int(lists), len(bank)))
        # self.order: list-sorted row -> bank row
        self.centroids, self.order, counts = kmeans_lists(bank, lists, seed)
        rows = bank.float().cpu()[self.order]
        self.rows_sq = (rows * rows).sum(1)
        # [b, -|b|²/2]·[q, 1] = b·q - |b|²/2 = -(|b|² - 2 b·q)/2: the bias rides in the product
        self.rows_aug = torch.cat([rows, -0.5 * self.rows_sq[:, None]], 1)
        self.rows = self.rows_aug[:, :-1]
        self.centroids_aug = torch.cat([-2 * self.centroids, (self.centroids * self.centroids).sum(1, keepdim=True)], 1)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self.lists, self.nprobe = lists, max(1, min(int(nprobe), lists))

    def search(self, query: torch.Tensor, k: int = 1, max_block: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances and bank indices of the ``k`` nearest rows found, (Q, k); rows not
        found (fewer than k in the probed lists) have distance inf and index -1."""
        n, p = query.shape[0], self.nprobe
        q_aug, q_sq, perm, pair_query, counts = self._pairs(query)
        q = q_aug[:, :-1]
        pd = torch.full((n * p, k), float("inf"))
        pi = torch.full((n * p, k), -1, dtype=torch.long)
        start = 0
        for lst, c in enumerate(counts):
            a, b = self.offsets[lst], self.offsets[lst + 1]
            if c and b > a:
                kk = min(k, b - a)
                rows, rows_sq = self.rows[a:b], self.rows_sq[a:b][None]
                step = max(1, max_block // (b - a))               # bound the (queries × rows) block
                for s0 in range(start, start + c, step):
                    s1 = min(s0 + step, start + c)
                    part = torch.addmm(rows_sq, q.index_select(0, pair_query[s0:s1]), rows.T, alpha=-2)
                    v, i = part.min(1, keepdim=True) if kk == 1 else part.topk(kk, dim=1, largest=False)
                    pd[s0:s1, :kk], pi[s0:s1, :kk] = v, i + a
            start += c
        out_d, out_i = torch.empty_like(pd), torch.empty_like(pi)
        out_d[perm], out_i[perm] = pd, pi                          # back to (query, probe) order
        out_d, out_i = out_d.reshape(n, p * k), out_i.reshape(n, p * k)
        v, j = out_d.min(1, keepdim=True) if k == 1 else out_d.topk(k, dim=1, largest=False)
        i = out_i.gather(1, j)                                     # not found: distance inf, index -1
        return v + q_sq[:, None], torch.where(i >= 0, self.order[i.clamp_min(0)], i)

    def nearest_sq(self, query: torch.Tensor, max_block: int = 1 << 22) -> torch.Tensor:
        """Squared distance of each query to the nearest row found (``search(query, 1)``'s
        distances, inf where the probed lists are empty), without the row's index: each list is
        scored as one (rows × queries) product and reduced by a plain column maximum of
        b·q - |b|²/2, which vectorises where an arg-minimum does not."""
        q_aug, q_sq, perm, pair_query, counts = self._pairs(query)
        found = torch.full((len(perm),), -float("inf"))
        start = 0
        for lst, c in enumerate(counts):
            a, b = self.offsets[lst], self.offsets[lst + 1]
            step = max(1, max_block // max(1, b - a))                 # bound the (rows × queries) block
            for s0 in range(start, start + c, step) if b > a else ():
                s1 = min(s0 + step, start + c)
                torch.amax(self.rows_aug[a:b] @ q_aug.index_select(0, pair_query[s0:s1]).T, 0, out=found[s0:s1])
            start += c
        best = torch.full((len(q_sq),), -float("inf")).scatter_reduce_(0, pair_query, found, "amax")
        return best.mul_(-2).add_(q_sq)

    def _pairs(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """The queries with a column of ones appended (Q, D + 1) and their squared norms, and the
        (query, probed list) pairs of the batch grouped by list: ``perm`` (pair positions in (query,
        probe) order, list by list), the query of each grouped pair, and pairs per list."""
        q = query.float().cpu().contiguous()
        q_aug, q_sq, p = torch.cat([q, q.new_ones(q.shape[0], 1)], 1), (q * q).sum(1), self.nprobe
        coarse = torch.addmm(q_sq[:, None], q_aug, self.centroids_aug.T)      # |q - c|²
        pair_list = smallest_columns(coarse, p).reshape(-1)
        perm = torch.argsort(pair_list, stable=True)              # (query, list) pairs grouped by list
        return (q_aug, q_sq, perm, torch.div(perm, p, rounding_mode="floor"),
                torch.bincount(pair_list, minlength=self.lists).tolist())


def smallest_columns(x: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the ``k`` smallest entries of each row of a float32 matrix (negative
    entries count as 0), (rows, k), smallest first; ``x`` is overwritten. ``topk`` sorts each row
    (~1 µs a row of 256 here); for a few columns, k vectorised minima over int32 keys are faster: a
    non-negative float's bits order as an int's, so the low bits can carry the column (values
    closer than 2^-(23 - bits) relative are ordered by column)."""
    n = x.shape[1]
    if k >= 8 or n > 1 << 16:
        return x.topk(k, dim=1, largest=False).indices
    bits = max(1, (n - 1).bit_length())
    low = (1 << bits) - 1
    key = x.clamp_min_(0).view(torch.int32).bitwise_and_(~low).bitwise_or_(torch.arange(n, dtype=torch.int32, device=x.device))
    out = []
    for j in range(k):
        m = key.amin(1, keepdim=True)
        out.append(m)
        if j + 1 < k:
            key.masked_fill_(key == m, torch.iinfo(torch.int32).max)
    return torch.cat(out, 1).bitwise_and_(low).long()


class NearestNeighbourIndex:
    """Exact or approximate nearest-neighbour search over a memory bank.

    ``backend='torch'`` computes exact distances by chunked matrix products on the bank's device;
    ``backend='faiss'`` uses faiss' flat L2 index (exact). ``approx`` is a faiss index-factory
    string (e.g. ``"IVF256,Flat"`` / ``"HNSW32"`` / ``"IVF1024,SQfp16"``), ``"auto"`` (chosen by
    bank size and device: ``auto_index_factory``, probing ``AUTO_NPROBE`` lists) or None / "exact".
    ``approximate`` says whether searches may miss the true neighbour; ``exact_search`` is always
    exact (the methods re-score the few patches an image score depends on with it).
    """

    def __init__(self, bank: torch.Tensor, *, backend: str = "torch", approx: str | None = None,
                 chunk: int = 4096, nprobe: int | None = None):
        self.bank = bank.float().contiguous()
        if approx == "auto":
            approx, nprobe = auto_index_factory(len(self.bank), self.bank.device), AUTO_NPROBE
        elif approx == "exact":
            approx = None
        self.factory = approx
        self.approximate = bool(approx) and not approx.startswith("Flat")
        self.backend = "faiss" if approx else backend
        self.chunk = chunk
        self._index = None
        self._bank_sq = None
        if approx and approx.startswith("gemm-IVF"):
            try:
                lists = int(approx[len("gemm-IVF"):])
            except ValueError:
                raise ValueError(f"knn_approx {approx!r}: expected gemm-IVF<number of lists>, e.g. gemm-IVF256") from None
            self.backend = "gemm-ivf"
            self._index = GemmIVF(self.bank, lists, nprobe or AUTO_NPROBE)
            self.factory = f"gemm-IVF{self._index.lists}"
        elif self.backend == "faiss":
            import faiss

            d = self.bank.shape[1]
            index = faiss.index_factory(d, approx) if approx else faiss.IndexFlatL2(d)
            data = self.bank.cpu().numpy()
            if not index.is_trained:
                index.train(data)
            index.add(data)
            if hasattr(index, "nprobe"):
                index.nprobe = nprobe or 64
            self._index = index
        elif self.backend != "torch":
            raise ValueError(f"unknown kNN backend {backend!r} (torch or faiss)")

    def search(self, query: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distances (not squared) and indices of the ``k`` nearest bank entries, (Q, k)."""
        if isinstance(self._index, GemmIVF):
            d, i = self._index.search(query.detach(), k)
            d = d.clamp_min_(0).sqrt_()
            short = (i < 0).any(1)                      # fewer than k rows in the probed lists
            if short.any():
                d[short], i[short] = (t.to(d.device) for t in self.exact_search(query[short], k))
            return d, i
        if self._index is not None:
            d, i = self._index.search(query.detach().float().cpu().numpy(), k)
            return torch.from_numpy(d).clamp_min_(0).sqrt_(), torch.from_numpy(i)
        return self.exact_search(query, k)

    def nearest(self, query: torch.Tensor) -> torch.Tensor:
        """Euclidean distance of each query to the nearest bank entry found, (Q,): ``search(query,
        1)``'s distances without the indices, which the inverted file and the exact search skip
        (a plain minimum over each block of distances vectorises; an arg-minimum does not)."""
        if isinstance(self._index, GemmIVF):
            d = self._index.nearest_sq(query.detach()).clamp_min_(0).sqrt_()
            short = torch.isinf(d)                      # every probed list empty
            if short.any():
                d[short] = self.exact_search(query[short], 1)[0][:, 0].to(d.device)
            return d
        if self._index is not None:
            return self.search(query, 1)[0][:, 0]
        query = query.float().to(self.bank.device)
        return min_sq_dists(query, (query * query).sum(1), self.bank, chunk=len(self.bank), rows=self.chunk,
                            others_sq=self._squared_norms()).sqrt_()

    def _squared_norms(self) -> torch.Tensor:
        if self._bank_sq is None:
            self._bank_sq = (self.bank * self.bank).sum(1)
        return self._bank_sq

    def exact_search(self, query: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``search`` by brute force (chunked matrix products on the bank's device), whatever the index."""
        query = query.float().to(self.bank.device)
        out_d, out_i = [], []
        bank_sq = self._squared_norms()
        for start in range(0, query.shape[0], self.chunk):
            q = query[start:start + self.chunk]
            # |q - b|² = |q|² + (|b|² - 2 q·b): rank by the fused second term, add |q|² to the k kept
            part = torch.addmm(bank_sq[None], q, self.bank.T, alpha=-2)
            dk, ik = part.min(1, keepdim=True) if k == 1 else torch.topk(part, k, dim=1, largest=False)
            out_d.append((dk + (q * q).sum(1, keepdim=True)).clamp_min_(0).sqrt_())
            out_i.append(ik)
        return torch.cat(out_d), torch.cat(out_i)


def rescore_top(dist: torch.Tensor, feats: torch.Tensor, index: NearestNeighbourIndex, top: int = 16) -> None:
    """Make the largest nearest-neighbour distance of each image exact, in place.

    ``dist`` (B, P): each patch's distance to its nearest bank entry as an approximate ``index``
    found it; ``feats`` (B, P, D) the patches. An approximate search can only overstate a distance
    (it may miss the nearest entry, never invent a nearer one), so the image score, the largest
    patch distance, is the figure it moves. Each round re-searches by brute force the ``top``
    largest distances of every image not yet settled; an image is settled once its largest exact
    distance is at least every distance still approximate (those can only be smaller than they
    read), so its maximum is then the exact search's. Usually one round: B·top queries instead of
    B·P. No-op for exact indexes or ``top`` 0."""
    if not index.approximate or top <= 0:
        return
    b, p = dist.shape
    k = min(top, p)
    exact = torch.zeros(b, p, dtype=torch.bool, device=dist.device)
    todo = torch.arange(b, device=dist.device)
    while len(todo):
        val, pos = dist[todo].masked_fill(exact[todo], -float("inf")).topk(k, dim=1)
        keep = torch.isfinite(val)                                        # not already exact
        rows = todo[:, None].expand(-1, k)[keep]
        pos = pos[keep]
        d, _ = index.exact_search(feats[rows.to(feats.device), pos.to(feats.device)], k=1)
        dist[rows, pos] = d[:, 0].to(dist.device, dist.dtype)
        exact[rows, pos] = True
        best_exact = dist[todo].masked_fill(~exact[todo], -float("inf")).amax(1)
        best_open = dist[todo].masked_fill(exact[todo], -float("inf")).amax(1)
        todo = todo[best_exact < best_open]


def knn(query: torch.Tensor, bank: torch.Tensor, k: int = 1, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot exact kNN (see NearestNeighbourIndex)."""
    return NearestNeighbourIndex(bank, **kw).search(query, k)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of (B, H, W) maps with a kernel of radius 4σ (as in PatchCore/PaDiM)."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = (k / k.sum())
    m = maps[:, None]
    m = F.conv2d(F.pad(m, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return m[:, 0]


def resize_blur_matrix(n_in: int, n_out: int, sigma: float, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """(n_out, n_in): one axis of ``patch_scores_to_maps`` as a matrix — linear resize from
    ``n_in`` to ``n_out`` samples (``align_corners=False``), then ``gaussian_blur``'s kernel with
    reflect padding. Built by running those two operations on the identity, so it is the same
    linear map, not an approximation of it."""
    return _resize_blur_matrix(int(n_in), int(n_out), float(sigma)).to(device, dtype)


@functools.lru_cache(maxsize=64)
def _resize_blur_matrix(n_in: int, n_out: int, sigma: float) -> torch.Tensor:
    m = torch.eye(n_in, dtype=torch.float64)[:, None]                            # n_in signals of length n_in
    m = F.interpolate(m, size=n_out, mode="linear", align_corners=False) if n_out != n_in else m
    if sigma > 0:
        radius = int(4 * sigma + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        k = torch.exp(-(x**2) / (2 * sigma**2))
        m = F.conv1d(F.pad(m, (radius, radius), mode="reflect"), (k / k.sum()).view(1, 1, -1))
    return m[:, 0].T.float().contiguous()                                         # (n_out, n_in)


def patch_scores_to_maps(scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """Upsample (B, h, w) patch scores bilinearly to ``size`` and Gaussian-smooth them.

    Both steps are linear and separable, so the map is ``A_h · S · A_wᵀ`` with one (H, h) and one
    (W, w) matrix per axis (``resize_blur_matrix``): two small matrix products per image instead
    of an upsampling pass and two 33-tap convolutions over the full-size map (the same result up
    to float rounding, ~10× less work at 64² → 256²)."""
    b, h, w = scores.shape
    a_h = resize_blur_matrix(h, size[0], sigma, device=scores.device)
    a_w = a_h if (w, size[1]) == (h, size[0]) else resize_blur_matrix(w, size[1], sigma, device=scores.device)
    return torch.matmul(torch.matmul(a_h, scores.float()), a_w.T)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
