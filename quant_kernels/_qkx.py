"""The per-group searches behind Q2_K, Q4_K and Q5_K (ggml's make_qkx2/qkx3/qp_quants).

Every function reproduces ggml's float32 operation order exactly: literals and ints are cast
to float32 at the point C converts them, sums run left to right, comparisons are strict.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._numeric import nint
from .config import JIT_OPTIONS, PARALLEL_JIT_OPTIONS

# ggml divides without checking (a zero importance weight can make sum_l2 == 0, giving inf or
# NaN that later comparisons reject); numba's default "python" error model would raise
# ZeroDivisionError instead, and its zero checks also block vectorization.
KERNEL_JIT = {**JIT_OPTIONS, "error_model": "numpy"}
PARALLEL_KERNEL_JIT = {**PARALLEL_JIT_OPTIONS, "error_model": "numpy"}

F32 = np.float32
GROUP_MAX_EPS = np.float32(1e-15)


@njit(**KERNEL_JIT)
def make_qkx2_quants(x, w, off, n, nmax, rmin, rdelta, nstep, use_mad, L, laux):
    """Affine (scale, min) fit of x[off:off+n] to levels 0..nmax; returns (scale, -min).

    Also ggml's make_qkx3_quants with explicit weights: in the ggml the oracle ships, qkx3
    differs only in testing ``max <= min``, the same as ``max == min`` for finite input.
    (Newer ggml guards qkx3's trial rounding against huge v; the oracle does not, so neither
    do we: nint's out-of-range garbage is reproduced bit for bit.)
    Levels go to L[off:off+n]; laux is scratch of at least n bytes.
    """
    fmax = F32(nmax)
    mn = x[off]
    mx = x[off]
    sum_w = w[off]
    sum_x = sum_w * x[off]
    for i in range(1, n):
        v = x[off + i]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
        wi = w[off + i]
        sum_w += wi
        sum_x += wi * v
    if mn > F32(0.0):
        mn = F32(0.0)
    if mx == mn:
        for i in range(n):
            L[off + i] = 0
        return F32(0.0), -mn
    iscale = fmax / (mx - mn)
    scale = F32(1.0) / iscale
    best = F32(0.0)
    for i in range(n):
        l = nint(iscale * (x[off + i] - mn))
        l = max(np.int32(0), min(np.int32(nmax), l))
        L[off + i] = l
        diff = scale * F32(l) + mn - x[off + i]
        if use_mad:
            diff = abs(diff)
        else:
            diff = diff * diff
        best += w[off + i] * diff
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + fmax) / (mx - mn)
        sum_l = F32(0.0)
        sum_l2 = F32(0.0)
        sum_xl = F32(0.0)
        for i in range(n):
            xi = x[off + i]
            v = iscale * (xi - mn)
            l = max(np.int32(0), min(np.int32(nmax), nint(v)))
            laux[i] = l
            wi = w[off + i]
            fl = F32(l)
            sum_l += wi * fl
            sum_l2 += wi * fl * fl
            sum_xl += wi * fl * xi
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > F32(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > F32(0.0):
                this_min = F32(0.0)
                this_scale = sum_xl / sum_l2
            cur = F32(0.0)
            for i in range(n):
                diff = this_scale * F32(laux[i]) + this_min - x[off + i]
                if use_mad:
                    diff = abs(diff)
                else:
                    diff = diff * diff
                cur += w[off + i] * diff
            if cur < best:
                for i in range(n):
                    L[off + i] = laux[i]
                best = cur
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(**KERNEL_JIT)
def make_qp_quants(n, nmax, x, L, qw):
    """Fit non-negative x[0:n] to levels 0..nmax with weights qw; returns the scale.

    L is uint8 and, as in ggml, a negative level wraps modulo 256 when stored.
    """
    fmax = F32(nmax)
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
            l = min(np.int32(nmax), nint(iscale_is * x[i]))
            diff = x[i] - scale_is * F32(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        l = min(np.int32(nmax), nint(iscale * x[i]))
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
                new_l = min(np.int32(nmax), nint(x[i] * sl2 / slx))
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
