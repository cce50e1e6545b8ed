"""The per-group searches behind Q2_K, Q4_K and Q5_K (ggml's make_qkx2/qkx3/qp_quants).

ggml fits one group of 16 or 32 weights at a time, one sequential float32 sum after another,
so it mostly waits on add latency. Here ``LANES`` groups are searched side by side in a *tile*:
a flat float32 buffer holding per-lane state rows and the groups transposed to (element, lane),
so every statement of the search is a vector operation across groups while each group still
sees exactly ggml's operations in ggml's order (sums left to right, no reassociation, no FMA,
strict comparisons). The bytes are identical; only the interleaving differs. One flat buffer
with compile-time offsets lets LLVM prove that the loads and stores never overlap, so the loops
vectorize without runtime alias checks; the hot loops index with ``np.uint64`` only (a signed
index gets numba's negative-index wraparound select, which blocks vectorization), and each step
keeps its levels, as ggml's Laux, for the step's error instead of recomputing them (1.26x on Q4_K).

make_qkx3_quants (the importance-weighted search) is make_qkx2_quants with other parameters
in the ggml the oracle ships: its only textual difference, ``max <= min`` for ``max == min``,
is the same test on finite input. (Newer ggml also guards qkx3's trial rounding against
out-of-range values; the oracle does not, so nint's out-of-range result is reproduced as is.)
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._numeric import MAGIC_NINT, nint
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
_MN, _MX, _SW, _SX, _BEST, _ISC, _SL, _SL2, _SXL, _CUR, _TS, _TM, _FLAT, _MN0, _XMIN = [
    k * LANES for k in range(6, 21)
]
T_X = 21 * LANES
T_STRIDE = 2 * LANES  # from element i to element i + 1 of the same lane
T_W = LANES  # from an element to its weight


# Unsigned copies of the offsets: the hot loops below index with np.uint64 only, because numba
# adds a negative-index wraparound select to every signed index and that select keeps LLVM from
# vectorizing across lanes (measured: _level_sums 3x faster, same bytes).
_U = np.uint64
_uL = _U(LANES)
_uX, _uSTRIDE, _uW = _U(T_X), _U(T_STRIDE), _U(T_W)
_uSCALE, _uMIN, _uLISC, _uLMIN = _U(T_SCALE), _U(T_MIN), _U(T_LISC), _U(T_LMIN)
_uMN, _uMX, _uSW, _uSX, _uBEST, _uISC, _uSL, _uSL2, _uSXL, _uCUR, _uTS, _uTM, _uFLAT, _uMN0, _uXMIN = [
    _U(v) for v in (_MN, _MX, _SW, _SX, _BEST, _ISC, _SL, _SL2, _SXL, _CUR, _TS, _TM, _FLAT, _MN0, _XMIN)
]
# |iscale*(x - min)| below this: nint is round-half-even there, and (v + 1.5*2^23) - 1.5*2^23 is
# the same integer, as a float (ggml's nearest_int, outside that range, gives garbage instead).
_FLOAT_LEVEL_LIMIT = F32(4194303.0)


@njit(**KERNEL_JIT)
def new_tile(n):
    """A tile buffer for groups of n weights."""
    return np.zeros(T_X + T_STRIDE * n, np.float32)


@njit(**KERNEL_JIT)
def load_tile(x, first_group, n, tb):
    """Element i of lane g = x[(first_group + g)*n + i]; lanes past the end of x get zeros."""
    un = _U(n)
    n_groups = _U(x.shape[0]) // un
    for g in range(_uL):
        gi = _U(first_group) + g
        if gi < n_groups:
            for i in range(un):
                tb[_uX + _uSTRIDE * i + g] = x[gi * un + i]
        else:
            for i in range(un):
                tb[_uX + _uSTRIDE * i + g] = F32(0.0)


@njit(inline="always", **KERNEL_JIT)
def _level(xi, iscale, mn, nmax):
    """ggml's MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))), as a float."""
    return F32(max(np.int32(0), min(nmax, nint(iscale * (xi - mn)))))


@njit(inline="always", **KERNEL_JIT)
def _flevel(xi, iscale, mn, fmax):
    """_level for |iscale*(x - min)| < 2^22, in the float domain: the same value with two float
    operations in place of four integer ones and a conversion (search_tile checks the range)."""
    r = (iscale * (xi - mn) + MAGIC_NINT) - MAGIC_NINT
    r = r if r < fmax else fmax
    return r if r > F32(0.0) else F32(0.0)


@njit(**KERNEL_JIT)
def _level_sums(tb, n, nmax, lv, use_float):
    """Per lane, over the levels of (ISC, MN): sum w*l, sum w*l*l, sum w*l*x; the levels go to
    ``lv`` (element i of lane g at LANES*i + g), as ggml keeps Laux for the step's error. ``lv`` is
    an array of its own: stores into ``tb`` at a row that depends on i would make LLVM check for
    overlap with the loads at run time and fall back to scalar code. ``use_float``: the levels by
    _flevel (search_tile checks that every lane is in its range), else by _level. The flag is the
    same for the whole call, so LLVM compiles the loop once per value (measured: as fast as two
    functions).

    Four elements per pass over the lanes keep the running sums in registers between passes.
    """
    fmax = F32(nmax)
    for g in range(_uL):
        tb[_uSL + g] = F32(0.0)
        tb[_uSL2 + g] = F32(0.0)
        tb[_uSXL + g] = F32(0.0)
    for i in range(_U(0), _U(n), _U(4)):
        for g in range(_uL):
            s, m = tb[_uISC + g], tb[_uMN + g]
            a, b, c = tb[_uSL + g], tb[_uSL2 + g], tb[_uSXL + g]
            for k in range(_U(4)):
                at = _uX + _uSTRIDE * (i + k) + g
                xi = tb[at]
                fl = _flevel(xi, s, m, fmax) if use_float else _level(xi, s, m, nmax)
                lv[_uL * (i + k) + g] = fl
                wl = tb[at + _uW] * fl
                a += wl
                b += wl * fl
                c += wl * xi
            tb[_uSL + g], tb[_uSL2 + g], tb[_uSXL + g] = a, b, c


@njit(**KERNEL_JIT)
def _fit_error(tb, n, nmax, use_mad, scale_row, offset_row, err_row):
    """Per lane: sum of w*|diff| or w*diff^2, diff = scale*l + offset - x, levels of (ISC, MN)."""
    sr, orow, er = _U(scale_row), _U(offset_row), _U(err_row)
    for g in range(_uL):
        tb[er + g] = F32(0.0)
    for i in range(_U(0), _U(n), _U(4)):
        for g in range(_uL):
            s, m = tb[_uISC + g], tb[_uMN + g]
            a, b = tb[sr + g], tb[orow + g]
            e = tb[er + g]
            for k in range(_U(4)):
                at = _uX + _uSTRIDE * (i + k) + g
                xi = tb[at]
                diff = a * _level(xi, s, m, nmax) + b - xi
                diff = abs(diff) if use_mad else diff * diff
                e += tb[at + _uW] * diff
            tb[er + g] = e


@njit(**KERNEL_JIT)
def _fit_error_levels(tb, n, use_mad, scale_row, offset_row, err_row, lv):
    """_fit_error with the levels _level_sums just kept (ggml's Laux), not recomputed."""
    sr, orow, er = _U(scale_row), _U(offset_row), _U(err_row)
    for g in range(_uL):
        tb[er + g] = F32(0.0)
    for i in range(_U(0), _U(n), _U(4)):
        for g in range(_uL):
            a, b = tb[sr + g], tb[orow + g]
            e = tb[er + g]
            for k in range(_U(4)):
                at = _uX + _uSTRIDE * (i + k) + g
                diff = a * lv[_uL * (i + k) + g] + b - tb[at]
                diff = abs(diff) if use_mad else diff * diff
                e += tb[at + _uW] * diff
            tb[er + g] = e


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
    un = _U(n)
    lv = np.empty(LANES * n, np.float32)
    for g in range(_uL):
        v = tb[_uX + g]
        w = tb[_uX + _uW + g]
        tb[_uMN + g] = v
        tb[_uMX + g] = v
        tb[_uSW + g] = w
        tb[_uSX + g] = w * v
    for i in range(_U(1), un):
        for g in range(_uL):
            at = _uX + _uSTRIDE * i + g
            v = tb[at]
            w = tb[at + _uW]
            tb[_uMN + g] = v if v < tb[_uMN + g] else tb[_uMN + g]
            tb[_uMX + g] = v if v > tb[_uMX + g] else tb[_uMX + g]
            tb[_uSW + g] += w
            tb[_uSX + g] += w * v
    for g in range(_uL):
        tb[_uXMIN + g] = tb[_uMN + g]
        m = F32(0.0) if tb[_uMN + g] > F32(0.0) else tb[_uMN + g]
        tb[_uMN + g] = m
        tb[_uMN0 + g] = m
        tb[_uFLAT + g] = F32(1.0) if tb[_uMX + g] == m else F32(0.0)
        s = fmax / (tb[_uMX + g] - m)
        tb[_uISC + g] = s
        tb[_uLISC + g] = s
        tb[_uLMIN + g] = m
        tb[_uSCALE + g] = F32(1.0) / s
    _fit_error(tb, n, imax, use_mad, T_SCALE, _MN, _BEST)
    for step in range(nstep + 1):
        num = rmin + rdelta * F32(step) + fmax
        # Rounding is monotonic, so each lane's iscale*(x - min) lies between its values at the
        # lane's smallest and largest x: when both are inside _FLOAT_LEVEL_LIMIT for every lane
        # (always, unless a fitted min or a tiny range sends iscale far out), the float-domain
        # levels are ggml's exactly; otherwise this step takes nint's integer path.
        far = np.int32(0)
        for g in range(_uL):
            mn = tb[_uMN + g]
            s = num / (tb[_uMX + g] - mn)
            tb[_uISC + g] = s
            lo = abs(s * (tb[_uXMIN + g] - mn))
            hi = abs(s * (tb[_uMX + g] - mn))
            near = (lo < _FLOAT_LEVEL_LIMIT and hi < _FLOAT_LEVEL_LIMIT) or tb[_uFLAT + g] != F32(0.0)
            far += np.int32(0) if near else np.int32(1)  # a flat lane's levels are discarded
        _level_sums(tb, n, imax, lv, far == 0)
        for g in range(_uL):
            sw, sx = tb[_uSW + g], tb[_uSX + g]
            sl, sl2, sxl = tb[_uSL + g], tb[_uSL2 + g], tb[_uSXL + g]
            D = sw * sl2 - sl * sl
            a = (sw * sxl - sx * sl) / D
            b = (sl2 * sx - sl * sxl) / D
            if b > F32(0.0):
                b = F32(0.0)
                a = sxl / sl2
            tb[_uTS + g] = a
            tb[_uTM + g] = b if D > F32(0.0) else F32(np.nan)  # a NaN error is never accepted
        _fit_error_levels(tb, n, use_mad, _TS, _TM, _CUR, lv)
        for g in range(_uL):  # selects, not a branch: the loop vectorizes
            better = tb[_uCUR + g] < tb[_uBEST + g]
            mn = tb[_uMN + g]
            tb[_uBEST + g] = tb[_uCUR + g] if better else tb[_uBEST + g]
            tb[_uSCALE + g] = tb[_uTS + g] if better else tb[_uSCALE + g]
            tb[_uLISC + g] = tb[_uISC + g] if better else tb[_uLISC + g]
            tb[_uLMIN + g] = mn if better else tb[_uLMIN + g]
            tb[_uMN + g] = tb[_uTM + g] if better else mn
    for g in range(_uL):
        if tb[_uFLAT + g] != F32(0.0):  # ggml returns early: all levels 0, scale 0
            tb[_uSCALE + g] = F32(0.0)
            tb[_uMIN + g] = -tb[_uMN0 + g]
            tb[_uLISC + g] = F32(0.0)
            tb[_uLMIN + g] = F32(0.0)
        else:
            tb[_uMIN + g] = -tb[_uMN + g]


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
    un = _U(n)
    s2r, swr = _U(sigma2_row), _U(sw_row)
    for g in range(_uL):
        gi = _U(first_group) + g
        if gi >= _U(n_groups):
            for i in range(un):
                tb[_uX + _uSTRIDE * i + _uW + g] = F32(0.0)
            tb[swr + g] = F32(0.0)
            continue
        col = (gi * un) % _U(n_per_row)
        s2 = tb[s2r + g]
        for i in range(un):
            at = _uX + _uSTRIDE * i + g
            tb[at + _uW] = qw[col + i] * np.sqrt(s2 + tb[at] * tb[at])
    # The sums run element by element, in ggml's order, for all lanes at once.
    for g in range(_uL):
        if _U(first_group) + g < _U(n_groups):
            tb[swr + g] = F32(0.0)
    for i in range(un):
        for g in range(_uL):
            if _U(first_group) + g < _U(n_groups):
                tb[swr + g] += tb[_uX + _uSTRIDE * i + _uW + g]
