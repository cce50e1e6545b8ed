"""The per-group searches behind Q2_K, Q4_K and Q5_K (ggml's make_qkx2/qkx3/qp_quants).

ggml fits one group of 16 or 32 weights at a time, one sequential float32 sum after another,
so it mostly waits on add latency. Here ``LANES`` groups are searched side by side: a tile is
transposed to (element, group) so every statement of the search is one vector operation across
groups, while each group still sees exactly ggml's operations in ggml's order (sums left to
right, no reassociation, no FMA, strict comparisons). The bytes are identical; only the
interleaving differs.

make_qkx3_quants (the importance-weighted search) is make_qkx2_quants with other parameters
in the ggml the oracle ships: its only textual difference, ``max <= min`` for ``max == min``,
is the same test on finite input. (Newer ggml also guards qkx3's trial rounding against
out-of-range values; the oracle does not, so nint's out-of-range result is reproduced as is.)
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._numeric import nint
from .config import JIT_OPTIONS, PARALLEL_JIT_OPTIONS

# ggml divides without checking (a zero importance weight can make sum_l2 == 0, giving inf or
# NaN that the later comparisons reject); numba's default "python" error model would raise
# ZeroDivisionError instead, and its zero checks also block vectorization.
KERNEL_JIT = {**JIT_OPTIONS, "error_model": "numpy"}
PARALLEL_KERNEL_JIT = {**PARALLEL_JIT_OPTIONS, "error_model": "numpy"}

F32 = np.float32
GROUP_MAX_EPS = np.float32(1e-15)
LANES = 16  # groups per tile: one AVX-512 register (two AVX2 registers) per float32 operation

# Rows of the per-tile state array: results first, then working values.
ST_SCALE = 0  # the group's scale (ggml's return value)
ST_MIN = 1  # ggml's *the_min: minus the fitted offset
ST_LISC = 2  # the search's own levels are clamp(nint(LISC*(x - LMIN)), 0, nmax); kept as a
ST_LMIN = 3  # recipe because most groups are requantized and never need them
ST_AUX = 4  # free for the caller's weight set-up
_MN, _MX, _SW, _SX, _BEST, _ISC, _SL, _SL2, _SXL, _CUR, _TS, _TM, _FLAT, _MN0 = range(5, 19)
N_STATE = 19


@njit(**KERNEL_JIT)
def new_tile(n):
    """Scratch for one tile of groups of n: x and weights as (n, LANES), and the state rows."""
    return (np.zeros((n, LANES), np.float32), np.zeros((n, LANES), np.float32),
            np.zeros((N_STATE, LANES), np.float32))


@njit(**KERNEL_JIT)
def load_tile(x, first_group, n, xt):
    """xt[i, g] = x[(first_group + g)*n + i]; lanes past the end of x get zeros."""
    n_groups = x.shape[0] // n
    for g in range(LANES):
        gi = first_group + g
        if gi < n_groups:
            for i in range(n):
                xt[i, g] = x[gi * n + i]
        else:
            for i in range(n):
                xt[i, g] = F32(0.0)


@njit(inline="always", **KERNEL_JIT)
def _level(xi, iscale, mn, nmax):
    """ggml's MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))), as a float."""
    return F32(max(np.int32(0), min(nmax, nint(iscale * (xi - mn)))))


@njit(inline="always", **KERNEL_JIT)
def _sums_step(xi, w, iscale, mn, nmax, sl, sl2, sxl):
    fl = _level(xi, iscale, mn, nmax)
    wl = w * fl
    return sl + wl, sl2 + wl * fl, sxl + wl * xi


@njit(inline="always", **KERNEL_JIT)
def _error_step(xi, w, iscale, mn, nmax, scale, offset, use_mad, err):
    diff = scale * _level(xi, iscale, mn, nmax) + offset - xi
    diff = abs(diff) if use_mad else diff * diff
    return err + w * diff


@njit(**KERNEL_JIT)
def _level_sums(xt, wt, n, nmax, st):
    """Per lane, over the levels of (ISC, MN): sum w*l, sum w*l*l, sum w*l*x.

    Four elements per pass over the lanes keep the running sums in registers between passes.
    """
    isc, mn, sl, sl2, sxl = st[_ISC], st[_MN], st[_SL], st[_SL2], st[_SXL]
    for g in range(LANES):
        sl[g] = F32(0.0)
        sl2[g] = F32(0.0)
        sxl[g] = F32(0.0)
    for i in range(0, n, 4):
        for g in range(LANES):
            s, m = isc[g], mn[g]
            a, b, c = sl[g], sl2[g], sxl[g]
            a, b, c = _sums_step(xt[i, g], wt[i, g], s, m, nmax, a, b, c)
            a, b, c = _sums_step(xt[i + 1, g], wt[i + 1, g], s, m, nmax, a, b, c)
            a, b, c = _sums_step(xt[i + 2, g], wt[i + 2, g], s, m, nmax, a, b, c)
            a, b, c = _sums_step(xt[i + 3, g], wt[i + 3, g], s, m, nmax, a, b, c)
            sl[g], sl2[g], sxl[g] = a, b, c


@njit(**KERNEL_JIT)
def _fit_error(xt, wt, n, nmax, use_mad, st, scale, offset, err):
    """Per lane: sum of w*|diff| or w*diff^2, diff = scale*l + offset - x, levels of (ISC, MN)."""
    isc, mn = st[_ISC], st[_MN]
    for g in range(LANES):
        err[g] = F32(0.0)
    for i in range(0, n, 4):
        for g in range(LANES):
            s, m, a, b = isc[g], mn[g], scale[g], offset[g]
            e = err[g]
            e = _error_step(xt[i, g], wt[i, g], s, m, nmax, a, b, use_mad, e)
            e = _error_step(xt[i + 1, g], wt[i + 1, g], s, m, nmax, a, b, use_mad, e)
            e = _error_step(xt[i + 2, g], wt[i + 2, g], s, m, nmax, a, b, use_mad, e)
            e = _error_step(xt[i + 3, g], wt[i + 3, g], s, m, nmax, a, b, use_mad, e)
            err[g] = e


@njit(**KERNEL_JIT)
def search_tile(xt, wt, n, nmax, rmin, rdelta, nstep, use_mad, st):
    """ggml make_qkx2_quants(n, nmax, x, w, L, &the_min, Laux, rmin, rdelta, nstep, use_mad)
    for the LANES groups of a tile (n a multiple of 4, nstep >= 1).

    Results per lane in st[ST_SCALE], st[ST_MIN] and the level recipe st[ST_LISC], st[ST_LMIN].
    """
    rmin = F32(rmin)
    rdelta = F32(rdelta)
    fmax = F32(nmax)
    imax = np.int32(nmax)
    mn, mx, sw, sx = st[_MN], st[_MX], st[_SW], st[_SX]
    best, isc, ts, tm, cur = st[_BEST], st[_ISC], st[_TS], st[_TM], st[_CUR]
    sl, sl2, sxl, flat, mn0 = st[_SL], st[_SL2], st[_SXL], st[_FLAT], st[_MN0]
    scale, the_min, lisc, lmin = st[ST_SCALE], st[ST_MIN], st[ST_LISC], st[ST_LMIN]
    for g in range(LANES):
        v = xt[0, g]
        mn[g] = v
        mx[g] = v
        sw[g] = wt[0, g]
        sx[g] = wt[0, g] * v
    for i in range(1, n):
        for g in range(LANES):
            v = xt[i, g]
            w = wt[i, g]
            mn[g] = v if v < mn[g] else mn[g]
            mx[g] = v if v > mx[g] else mx[g]
            sw[g] += w
            sx[g] += w * v
    for g in range(LANES):
        m = F32(0.0) if mn[g] > F32(0.0) else mn[g]
        mn[g] = m
        mn0[g] = m
        flat[g] = F32(1.0) if mx[g] == m else F32(0.0)
        s = fmax / (mx[g] - m)
        isc[g] = s
        lisc[g] = s
        lmin[g] = m
        scale[g] = F32(1.0) / s
    _fit_error(xt, wt, n, imax, use_mad, st, scale, mn, best)
    for step in range(nstep + 1):
        num = rmin + rdelta * F32(step) + fmax
        for g in range(LANES):
            isc[g] = num / (mx[g] - mn[g])
        _level_sums(xt, wt, n, imax, st)
        for g in range(LANES):
            D = sw[g] * sl2[g] - sl[g] * sl[g]
            a = (sw[g] * sxl[g] - sx[g] * sl[g]) / D
            b = (sl2[g] * sx[g] - sl[g] * sxl[g]) / D
            if b > F32(0.0):
                b = F32(0.0)
                a = sxl[g] / sl2[g]
            ts[g] = a
            tm[g] = b if D > F32(0.0) else F32(np.nan)  # NaN error: never accepted
        _fit_error(xt, wt, n, imax, use_mad, st, ts, tm, cur)
        for g in range(LANES):
            if cur[g] < best[g]:
                best[g] = cur[g]
                scale[g] = ts[g]
                lisc[g] = isc[g]
                lmin[g] = mn[g]
                mn[g] = tm[g]
    for g in range(LANES):
        if flat[g] != F32(0.0):  # ggml returns early: all levels 0, scale 0
            scale[g] = F32(0.0)
            the_min[g] = -mn0[g]
            lisc[g] = F32(0.0)
            lmin[g] = F32(0.0)
        else:
            the_min[g] = -mn[g]


@njit(**KERNEL_JIT)
def search_levels(x, xo, n, nmax, lisc, lmin, L, lo):
    """L[lo:lo+n] = the levels make_qkx2_quants left for x[xo:xo+n], from the lane's recipe."""
    imax = np.int32(nmax)
    for i in range(n):
        L[lo + i] = np.uint8(_level(x[xo + i], lisc, lmin, imax))


@njit(**KERNEL_JIT)
def make_qp_quants(n, nmax, x, L, qw):
    """ggml make_qp_quants: fit x[0:n] (>= 0 in practice) to levels 0..nmax with weights qw.

    Returns the scale. L is uint8 and, as in ggml, a negative level wraps modulo 256 when stored
    (and is then read back wrapped).
    """
    fmax = F32(nmax)
    imax = np.int32(nmax)
    mx = F32(0.0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    iscale = fmax / mx
    for i in range(n):
        L[i] = np.uint8(nint(iscale * x[i]) & 255)
    scale = F32(1.0) / iscale
    best_mse = F32(0.0)
    for i in range(n):
        diff = x[i] - scale * F32(L[i])
        best_mse += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F32(0.1) * F32(step) + fmax) / mx
        scale_is = F32(1.0) / iscale_is
        mse = F32(0.0)
        for i in range(n):
            l = min(imax, nint(iscale_is * x[i]))
            diff = x[i] - scale_is * F32(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        l = min(imax, nint(iscale * x[i]))
        L[i] = np.uint8(l & 255)
        sumlx += qw[i] * x[i] * F32(l)
        suml2 += qw[i] * F32(l) * F32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            wi = qw[i]
            li = F32(L[i])
            slx = sumlx - wi * x[i] * li
            sl2 = suml2 - wi * li * li
            if slx > F32(0.0) and sl2 > F32(0.0):
                new_l = min(imax, nint(x[i] * sl2 / slx))
                if new_l != np.int32(L[i]):
                    fl = F32(new_l)
                    slx += wi * x[i] * fl
                    sl2 += wi * fl * fl
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = np.uint8(new_l & 255)
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > F32(0.0) else F32(0.0)
