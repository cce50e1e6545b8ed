"""The per-group searches behind Q2_K, Q4_K and Q5_K (ggml's make_qkx2/qkx3/qp_quants).

ggml fits one group of 16 or 32 weights at a time, one sequential float32 sum after another,
so it mostly waits on add latency. Here ``LANES`` groups are searched side by side in a *tile*:
a flat float32 buffer holding per-lane state rows and the groups transposed to (element, lane),
so every statement of the search is a vector operation across groups while each group still
sees exactly ggml's operations in ggml's order (sums left to right, no reassociation, no FMA,
strict comparisons). The bytes are identical; only the interleaving differs. One flat buffer
with compile-time offsets lets LLVM prove that the loads and stores never overlap, so the loops
vectorize without runtime alias checks.

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
# Groups per tile: two AVX-512 registers per operation, enough independent work to hide the
# latency of each group's sequential sums.
LANES = 32

# Tile layout: rows of LANES floats at these offsets, then element i of every lane's group at
# T_X + 2*LANES*i and its weight at T_X + 2*LANES*i + LANES.
T_SCALE = 0 * LANES  # result: the group's scale (ggml's return value)
T_MIN = 1 * LANES  # result: ggml's *the_min, minus the fitted offset
T_LISC = 2 * LANES  # result: the search's own levels are clamp(nint(LISC*(x - LMIN)), 0, nmax),
T_LMIN = 3 * LANES  # kept as a recipe since most groups are requantized and never need them
T_AUX = 4 * LANES  # free for the caller (weight set-up)
T_AUX2 = 5 * LANES  # free for the caller
_MN, _MX, _SW, _SX, _BEST, _ISC, _SL, _SL2, _SXL, _CUR, _TS, _TM, _FLAT, _MN0 = [
    k * LANES for k in range(6, 20)
]
T_X = 20 * LANES
T_STRIDE = 2 * LANES  # from element i to element i + 1 of the same lane
T_W = LANES  # from an element to its weight


@njit(**KERNEL_JIT)
def new_tile(n):
    """A tile buffer for groups of n weights."""
    return np.zeros(T_X + T_STRIDE * n, np.float32)


@njit(**KERNEL_JIT)
def load_tile(x, first_group, n, tb):
    """Element i of lane g = x[(first_group + g)*n + i]; lanes past the end of x get zeros."""
    n_groups = x.shape[0] // n
    for g in range(LANES):
        gi = first_group + g
        if gi < n_groups:
            for i in range(n):
                tb[T_X + T_STRIDE * i + g] = x[gi * n + i]
        else:
            for i in range(n):
                tb[T_X + T_STRIDE * i + g] = F32(0.0)


@njit(inline="always", **KERNEL_JIT)
def _level(xi, iscale, mn, nmax):
    """ggml's MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))), as a float."""
    return F32(max(np.int32(0), min(nmax, nint(iscale * (xi - mn)))))


@njit(**KERNEL_JIT)
def _level_sums(tb, n, nmax):
    """Per lane, over the levels of (ISC, MN): sum w*l, sum w*l*l, sum w*l*x.

    Four elements per pass over the lanes keep the running sums in registers between passes.
    """
    for g in range(LANES):
        tb[_SL + g] = F32(0.0)
        tb[_SL2 + g] = F32(0.0)
        tb[_SXL + g] = F32(0.0)
    for i in range(0, n, 4):
        for g in range(LANES):
            s, m = tb[_ISC + g], tb[_MN + g]
            a, b, c = tb[_SL + g], tb[_SL2 + g], tb[_SXL + g]
            for k in range(4):
                at = T_X + T_STRIDE * (i + k) + g
                xi = tb[at]
                fl = _level(xi, s, m, nmax)
                wl = tb[at + T_W] * fl
                a += wl
                b += wl * fl
                c += wl * xi
            tb[_SL + g], tb[_SL2 + g], tb[_SXL + g] = a, b, c


@njit(**KERNEL_JIT)
def _fit_error(tb, n, nmax, use_mad, scale_row, offset_row, err_row):
    """Per lane: sum of w*|diff| or w*diff^2, diff = scale*l + offset - x, levels of (ISC, MN)."""
    for g in range(LANES):
        tb[err_row + g] = F32(0.0)
    for i in range(0, n, 4):
        for g in range(LANES):
            s, m = tb[_ISC + g], tb[_MN + g]
            a, b = tb[scale_row + g], tb[offset_row + g]
            e = tb[err_row + g]
            for k in range(4):
                at = T_X + T_STRIDE * (i + k) + g
                xi = tb[at]
                diff = a * _level(xi, s, m, nmax) + b - xi
                diff = abs(diff) if use_mad else diff * diff
                e += tb[at + T_W] * diff
            tb[err_row + g] = e


@njit(**KERNEL_JIT)
def search_tile(tb, n, nmax, rmin, rdelta, nstep, use_mad):
    """ggml make_qkx2_quants(n, nmax, x, w, L, &the_min, Laux, rmin, rdelta, nstep, use_mad)
    for the LANES groups of a tile (n a multiple of 4, nstep >= 1).

    Results per lane in the T_SCALE and T_MIN rows, and the level recipe in T_LISC, T_LMIN.
    """
    rmin = F32(rmin)
    rdelta = F32(rdelta)
    fmax = F32(nmax)
    imax = np.int32(nmax)
    for g in range(LANES):
        v = tb[T_X + g]
        w = tb[T_X + T_W + g]
        tb[_MN + g] = v
        tb[_MX + g] = v
        tb[_SW + g] = w
        tb[_SX + g] = w * v
    for i in range(1, n):
        for g in range(LANES):
            at = T_X + T_STRIDE * i + g
            v = tb[at]
            w = tb[at + T_W]
            tb[_MN + g] = v if v < tb[_MN + g] else tb[_MN + g]
            tb[_MX + g] = v if v > tb[_MX + g] else tb[_MX + g]
            tb[_SW + g] += w
            tb[_SX + g] += w * v
    for g in range(LANES):
        m = F32(0.0) if tb[_MN + g] > F32(0.0) else tb[_MN + g]
        tb[_MN + g] = m
        tb[_MN0 + g] = m
        tb[_FLAT + g] = F32(1.0) if tb[_MX + g] == m else F32(0.0)
        s = fmax / (tb[_MX + g] - m)
        tb[_ISC + g] = s
        tb[T_LISC + g] = s
        tb[T_LMIN + g] = m
        tb[T_SCALE + g] = F32(1.0) / s
    _fit_error(tb, n, imax, use_mad, T_SCALE, _MN, _BEST)
    for step in range(nstep + 1):
        num = rmin + rdelta * F32(step) + fmax
        for g in range(LANES):
            tb[_ISC + g] = num / (tb[_MX + g] - tb[_MN + g])
        _level_sums(tb, n, imax)
        for g in range(LANES):
            sw, sx = tb[_SW + g], tb[_SX + g]
            sl, sl2, sxl = tb[_SL + g], tb[_SL2 + g], tb[_SXL + g]
            D = sw * sl2 - sl * sl
            a = (sw * sxl - sx * sl) / D
            b = (sl2 * sx - sl * sxl) / D
            if b > F32(0.0):
                b = F32(0.0)
                a = sxl / sl2
            tb[_TS + g] = a
            tb[_TM + g] = b if D > F32(0.0) else F32(np.nan)  # a NaN error is never accepted
        _fit_error(tb, n, imax, use_mad, _TS, _TM, _CUR)
        for g in range(LANES):
            if tb[_CUR + g] < tb[_BEST + g]:
                tb[_BEST + g] = tb[_CUR + g]
                tb[T_SCALE + g] = tb[_TS + g]
                tb[T_LISC + g] = tb[_ISC + g]
                tb[T_LMIN + g] = tb[_MN + g]
                tb[_MN + g] = tb[_TM + g]
    for g in range(LANES):
        if tb[_FLAT + g] != F32(0.0):  # ggml returns early: all levels 0, scale 0
            tb[T_SCALE + g] = F32(0.0)
            tb[T_MIN + g] = -tb[_MN0 + g]
            tb[T_LISC + g] = F32(0.0)
            tb[T_LMIN + g] = F32(0.0)
        else:
            tb[T_MIN + g] = -tb[_MN + g]


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


@njit(**KERNEL_JIT)
def load_imatrix_weights(tb, qw, first_group, n, n_groups, n_per_row, sigma2_row, sw_row):
    """ggml's importance weights qw[col]*sqrtf(sigma2 + x*x) for every lane (sigma2 per lane in
    row sigma2_row, set by the caller per block), and their sequential per-group sums into
    sw_row. Lanes past the last group get zero weights."""
    for g in range(LANES):
        gi = first_group + g
        if gi >= n_groups:
            for i in range(n):
                tb[T_X + T_STRIDE * i + T_W + g] = F32(0.0)
            tb[sw_row + g] = F32(0.0)
            continue
        col = (gi * n) % n_per_row
        s2 = tb[sigma2_row + g]
        sumw = F32(0.0)
        for i in range(n):
            at = T_X + T_STRIDE * i + g
            w = qw[col + i] * np.sqrt(s2 + tb[at] * tb[at])
            tb[at + T_W] = w
            sumw += w
        tb[sw_row + g] = sumw
