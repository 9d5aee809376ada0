"""fp8 decode / encode on the CPU as compiled loops: the rounding spec of ``rounding.py``, bit for bit.

torch has no vectorised fp8 conversion on the CPU (decoding runs at ~4 ns per element) and the
spec's stochastic rounding is some thirty element-wise passes in eager torch: about 100 ns per
element in all, half an hour for a 20 GB fp8 checkpoint. Here one loop reads each stored element
once, decodes it arithmetically, adds the LoRA's product, rounds with integer arithmetic and
writes it once; the loops are branch-free so the compiler vectorises them. ``tests/test_fp8_cpu.py``
holds them to the torch spec bit for bit (normals, subnormals, ties, saturation, inf, NaN, signed
zeros, scaled fp8, both modes, both formats).

Compiled with numba on first use (cached on disk); ``available()`` is False where numba is not
installed, and the torch spec runs instead.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .rounding import MASK32

PARALLEL = False
GOLDEN = 0x9E3779B9  # the constant uniform24 adds to the high word of the element index


@functools.cache
def _kernels():
    """Compile on first use (importing numba costs ~0.3 s; compiling ~5 s, once: numba caches it on disk)."""
    import numba
    from llvmlite import binding, ir

    if numba.config.CPU_NAME is None and numba.config.CPU_FEATURES is None and \
            "+avx512f" in binding.get_host_cpu_features().flatten():
        # LLVM tunes AVX-512 machines for 256-bit vectors; these loops run 30-40 % faster at 512
        # (measured on the dev VM's Xeon). Only tuning: results are the same either way. Left alone
        # when the user chose numba's target.
        numba.config.CPU_NAME = binding.get_host_cpu_name()
        numba.config.CPU_FEATURES = binding.get_host_cpu_features().flatten() + ",-prefer-256-bit"
    from numba.core import types
    from numba.extending import intrinsic

    def i32_op(name: str):
        """A wrapping 32-bit integer operation: numba widens int32 arithmetic to int64, which halves
        the vector width; these keep every integer lane 32 bits wide."""
        @intrinsic
        def op(typingctx, a, b):  # noqa: ARG001 (numba's intrinsic signature)
            def codegen(context, builder, sig, args):
                x, y = (context.cast(builder, v, t, types.int32) for v, t in zip(args, sig.args))
                return getattr(builder, name)(x, y)
            return types.int32(a, b), codegen
        return op

    add, sub, mul, xor, and_, or_, shl, shr = (i32_op(n) for n in ("add", "sub", "mul", "xor", "and_", "or_",
                                                                     "shl", "lshr"))

    @intrinsic
    def f32_bits(typingctx, x):  # noqa: ARG001
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))
        return types.int32(types.float32), codegen

    @intrinsic
    def bits_f32(typingctx, x):  # noqa: ARG001
        def codegen(context, builder, signature, args):
            return builder.bitcast(context.cast(builder, args[0], signature.args[0], types.int32), ir.FloatType())
        return types.float32(x), codegen

    inline = numba.njit(inline="always", fastmath=False, error_model="numpy")
    loop = numba.njit(cache=True, nogil=True, parallel=PARALLEL, fastmath=False, error_model="numpy")

    @inline
    def pow2(k):
        return bits_f32(shl(add(k, 127), 23))

    @intrinsic
    def half_f32(typingctx, x):  # noqa: ARG001
        """The float32 value of the IEEE half whose bits are the low 16 of ``x`` (one vector
        instruction with F16C)."""
        def codegen(context, builder, signature, args):
            h = builder.trunc(context.cast(builder, args[0], signature.args[0], types.int32), ir.IntType(16))
            return builder.fpext(builder.bitcast(h, ir.HalfType()), ir.FloatType())
        return types.float32(x), codegen

    @inline
    def decode8(d, e4m3):
        """fp8 bits (int32, 0..255) -> float32, exact. An e5m2 value is the top byte of an IEEE
        half (inf and NaN included); an e4m3fn magnitude shifted into a half's exponent and
        mantissa fields is the value / 256 (subnormals too), and S.1111.111 is its NaN."""
        if e4m3:
            v = np.float32(half_f32(or_(shl(and_(d, 0x80), 8), shl(and_(d, 0x7F), 7))) * np.float32(256.0))
            return np.float32(np.nan) if and_(d, 0x7F) == 0x7F else v
        return half_f32(shl(d, 8))

    @inline
    def mix32(x):
        x = xor(x, shr(x, 16))
        x = mul(x, 0x7FEB352D)
        x = xor(x, shr(x, 15))
        x = mul(x, 0x846CA68B - (1 << 32))
        return xor(x, shr(x, 16))

    @inline
    def round8(d, v, o, scale, scaled, m, mant, bias, e4m3, stochastic, salt, index_hi, idx):
        """One element of ``rounding.round_into``: stored bits ``d`` (int32), new value ``v``, old
        value ``o``; returns (the bits to store, whether it saturated).

        The magnitude is scaled by a power of two into [0, 2**(mant+1)) (exact, subnormals
        included), so its integer part ``r`` is the fp8 value at or below it and ``y - r`` the
        exact fraction of the step to the next; adding 2**23 rounds to the nearest integer, ties
        to even; a carry runs into the exponent field by itself. Stochastic rounding goes up when
        ``u < frac * 2**24``: the spec's ``u * (hi - lo) < (a - lo) * 2**24`` divided by the step
        ``hi - lo``, a power of two, so the same comparison bit for bit."""
        changed = v != o  # NaN always is
        t = np.float32(v / scale) if scaled else v
        a = abs(t)
        sat = (a > m) and changed
        a = m if a > m else a
        nan = a != a
        a = np.float32(0.0) if nan else a
        emin = sub(1, bias)
        e = max(sub(and_(shr(f32_bits(a), 23), 0xFF), 127), emin)
        y = np.float32(a * pow2(sub(mant, e)))
        base = shl(sub(e, emin), mant)
        if stochastic:
            r = np.int32(y)  # truncation: the fp8 value at or below a
            frac = np.float32(y - np.float32(r))
            u = np.float32(shr(mix32(xor(mix32(xor(idx, salt)), index_hi)), 8))
            mag = add(add(base, r), np.int32(u < np.float32(frac * np.float32(16777216.0))))
            negative = t < 0
        else:
            r = np.float32(np.float32(y + np.float32(8388608.0)) - np.float32(8388608.0))
            mag = add(base, np.int32(r))
            negative = f32_bits(t) < 0
        bits = 0x7F if nan else (or_(mag, 0x80) if negative else mag)
        # keep the old bits where the stored value does not move: same bits, or both zeros
        moved = changed and bits != d and and_(or_(bits, d), 0x7F) != 0
        return (bits if moved else d), sat

    def decoder(scaled: bool, e4m3: bool):
        mant, bias = (np.int32(3), np.int32(7)) if e4m3 else (np.int32(2), np.int32(15))

        @loop
        def decode(out, src, scale):
            for i in numba.prange(src.size):
                v = decode8(np.int32(src[i]), e4m3)
                out[i] = np.float32(v * scale) if scaled else v
        return decode

    def encoder(mode: int, scaled: bool, e4m3: bool, stochastic: bool):
        """mode 0: store ``value`` (old values decoded from ``dst``); 1: ``value``, old values
        ``original``; 2: store decoded + ``delta``; 3: decoded + ``delta * factor`` (two
        roundings, as the reference). The flags are closure constants, so each combination
        compiles to its own branch-free loop, which the compiler vectorises."""
        mant, bias = (np.int32(3), np.int32(7)) if e4m3 else (np.int32(2), np.int32(15))
        m = np.float32(448.0) if e4m3 else np.float32(57344.0)

        @loop
        def encode(dst, value, original, delta, factor, scale, salt, index_hi, index_lo):
            saturated = np.int32(0)
            for i in numba.prange(dst.size):
                d = np.int32(dst[i])
                o = decode8(d, e4m3)
                o = np.float32(o * scale) if scaled else o
                if mode == 0:
                    v = value[i]
                elif mode == 1:
                    v = value[i]
                    o = original[i]
                elif mode == 2:
                    v = np.float32(o + delta[i])
                else:
                    v = np.float32(o + np.float32(delta[i] * factor))
                bits, sat = round8(d, v, o, scale, scaled, m, mant, bias, e4m3, stochastic, salt, index_hi,
                                   add(index_lo, i))
                saturated = add(saturated, np.int32(sat))
                dst[i] = bits
            return saturated
        return encode

    return functools.cache(decoder), functools.cache(encoder)


def available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these loops can take the tensors in place (CPU, contiguous)."""
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) and available()


def _flat(t: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    t = t.reshape(-1)
    return (t.view(dtype) if dtype is not None else t).numpy()


def decode_(out: torch.Tensor, stored: torch.Tensor, scale: float | None) -> torch.Tensor:
    """``out`` (fp32) = fp32 values of fp8 ``stored`` (times ``scale``, rounded once, as torch does)."""
    decoder, _ = _kernels()
    decoder(scale is not None, stored.dtype == torch.float8_e4m3fn)(
        _flat(out), _flat(stored, torch.uint8), np.float32(scale or 1.0))
    return out


_NONE = np.empty(0, np.float32)


def _encode(dst: torch.Tensor, value: torch.Tensor | None, original: torch.Tensor | None,
            delta: torch.Tensor | None, factor: float | None, *, stochastic: bool, salt: int, index_offset: int,
            scale: float | None) -> int:
    _, encoder = _kernels()
    n = dst.numel()
    if (index_offset + n - 1) >> 32 != index_offset >> 32 and n:  # the index's high word changes inside: split
        cut = (((index_offset >> 32) + 1) << 32) - index_offset
        parts = [(0, cut, index_offset), (cut, n, index_offset + cut)]
        flat = [None if t is None else t.reshape(-1) for t in (dst, value, original, delta)]
        return sum(_encode(*(None if t is None else t[a:b] for t in flat), factor, stochastic=stochastic, salt=salt,
                           index_offset=off, scale=scale) for a, b, off in parts)
    mode = (1 if original is not None else 0) if value is not None else (2 if factor is None else 3)
    encode = encoder(mode, scale is not None, dst.dtype == torch.float8_e4m3fn, stochastic)
    return int(encode(
        _flat(dst, torch.uint8), _NONE if value is None else _flat(value),
        _NONE if original is None else _flat(original), _NONE if delta is None else _flat(delta),
        np.float32(factor or 0.0), np.float32(scale or 1.0), _i32(salt), _i32((index_offset >> 32) + GOLDEN),
        _i32(index_offset)))


def _i32(x: int) -> np.int32:
    """The low 32 bits of ``x`` as the kernels' (wrapping, signed) int32."""
    x &= MASK32
    return np.int32(x - (1 << 32) if x >= 1 << 31 else x)


def encode_(dst: torch.Tensor, value: torch.Tensor, original: torch.Tensor | None, *, stochastic: bool,
            salt: int, index_offset: int, scale: float | None) -> int:
    """``rounding.round_into`` for fp8 ``dst``; ``original`` None means ``dst``'s own decoded value."""
    return _encode(dst, value, original, None, None, stochastic=stochastic, salt=salt, index_offset=index_offset,
                   scale=scale)


def add_encode_(dst: torch.Tensor, delta: torch.Tensor, factor: float | None, *, stochastic: bool, salt: int,
                index_offset: int, scale: float | None) -> int:
    """``dst`` += ``delta`` (times ``factor``), in one pass: decode, add, round, store. The same
    arithmetic as ``decode``, ``add_`` and ``encode_`` one after the other, bit for bit."""
    return _encode(dst, None, None, delta, factor, stochastic=stochastic, salt=salt, index_offset=index_offset,
                   scale=scale)
