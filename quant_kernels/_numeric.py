"""Scalar float32 helpers shared by the kernels.

Everything here is evaluated in float32 exactly as ggml's C reference does it (no FMA, no
float64 intermediates), so results match byte for byte. Kernels import these; they are
``inline='always'`` so calling them costs nothing inside a hot loop.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .config import JIT_OPTIONS

F32 = np.float32
MAGIC_NINT = np.float32(12582912.0)  # 1.5 * 2**23


@intrinsic
def f32_bits(typingctx, x):
    """Reinterpret a float32 as int32 (no conversion)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, x):
    """Reinterpret the low 32 bits of an integer as float32 (no conversion)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif x.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def opaque(typingctx, v):
    """``v`` unchanged, through an empty inline-asm statement LLVM cannot see through.

    numba runs no SLP vectorizer, and its function passes fully unroll loops with a short constant
    trip count before the loop vectorizer runs, so a 32-element reduction such as a block's max
    ends up as 32 scalar steps. Taking the trip count through ``opaque`` keeps it a loop, which
    the loop vectorizer then turns into vector operations. Integers only; values are unaffected.

    Meant for loops that only read arrays (a reduction): with an unknown trip count, a loop that
    also stores into an array it reads gets runtime overlap checks, and in the tile kernels of
    q6_k/q3_k those checks sent the loops to their scalar fallback.
    """
    if not isinstance(v, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        t = context.get_value_type(signature.return_type)
        return builder.asm(ir.FunctionType(t, [t]), "", "=r,0", [args[0]], side_effect=False)

    return v(v), codegen


@njit(inline="always", **JIT_OPTIONS)
def nint(v):
    """ggml's ``nearest_int``: round half to even via the 1.5*2^23 trick, bit for bit.

    Valid for |v| <= 4194303; outside that range it returns the same garbage ggml does.
    """
    val = np.float32(v) + MAGIC_NINT
    i = f32_bits(val)
    return np.int32((i & np.int32(0x007FFFFF)) - np.int32(0x00400000))


@njit(inline="always", **JIT_OPTIONS)
def roundf(v):
    """C ``roundf``: round half away from zero, in float32, for every float32 (NaN, inf and -0.0
    included), branch-free so that loops calling it vectorize.

    ``v - trunc(v)`` is exact (it only clears v's integer bits; 0 once |v| >= 2**23), and when
    its magnitude is at least 0.5 the result is ``trunc(v) + copysign(1, v)``. The select (not
    ``t + 0.0``, which would turn -0.0 into +0.0) keeps trunc's sign for -0.5 < v <= -0.0.
    Checked against the branching form and a float64 reference on all 2**32 bit patterns.
    """
    v = np.float32(v)
    t = np.float32(np.trunc(v))
    one = bits_f32((f32_bits(v) & np.int32(-0x80000000)) | np.int32(0x3F800000))  # copysign(1, v)
    up = t + one
    return up if np.abs(v - t) >= np.float32(0.5) else t


@njit(inline="always", **JIT_OPTIONS)
def fp16_bits(v):
    """float32 -> IEEE half bits, round to nearest even, subnormals included.

    Identical to numpy's ``astype(np.float16)`` for every finite input (and inf/NaN map to
    inf/qNaN). Returned as uint16.
    """
    u = f32_bits(np.float32(v))
    sign = (u >> np.int32(16)) & np.int32(0x8000)
    a = u & np.int32(0x7FFFFFFF)
    if a >= np.int32(0x47800000):  # >= 65536.0: inf, or NaN
        if a > np.int32(0x7F800000):
            o = np.int32(0x7E00)
        else:
            o = np.int32(0x7C00)
    elif a < np.int32(0x38800000):  # below 2**-14: subnormal or zero
        f = bits_f32(a) + np.float32(0.5)
        o = f32_bits(f) - np.int32(0x3F000000)
    else:
        mant_odd = (a >> np.int32(13)) & np.int32(1)
        a = a + np.int32(-939520001)  # ((15 - 127) << 23) + 0xfff
        a = a + mant_odd
        o = a >> np.int32(13)
    return np.uint16(o | sign)


@njit(inline="always", **JIT_OPTIONS)
def fp16_to_f32(h):
    """IEEE half bits -> float32 (exact)."""
    h = np.int32(h) & np.int32(0xFFFF)
    sign = (h & np.int32(0x8000)) << np.int32(16)
    e = (h >> np.int32(10)) & np.int32(0x1F)
    m = h & np.int32(0x3FF)
    if e == 0:
        val = np.float32(m) * np.float32(5.960464477539063e-08)  # 2**-24, exact
        if sign != 0:
            val = -val
        return val
    if e == 31:
        bits = sign | np.int32(0x7F800000) | (m << np.int32(13))
    else:
        bits = sign | ((e + np.int32(112)) << np.int32(23)) | (m << np.int32(13))
    return bits_f32(bits)


@njit(inline="always", **JIT_OPTIONS)
def fp16_round(v):
    """float32 -> nearest half -> float32: the value ggml uses after storing ``d``."""
    return fp16_to_f32(fp16_bits(v))
