"""Fused ``W += scale * (up @ down)`` for many weights in one launch (the grouped low-rank update).

One program patches one tile of one weight: it loads the tile once, widens it to fp32 (times the
per-tensor scale of scaled fp8), adds every LoRA on that weight in order (``v = v + (up_j @ down_j)
* scale_j``, a tensor-core dot with fp32 accumulation per LoRA), rounds once into the stored dtype
and stores the tile. A tile table maps program ids to (layer, tile row, tile column), so every
target of a model goes out in a single launch whatever its shape.

The rounding is the spec of ``lorakit.codecs.rounding``, written with integer arithmetic on the bit
patterns (bf16 and fp8 encode/decode) rather than hardware conversions: the same code is exact on
every GPU generation and under ``TRITON_INTERPRET=1``, whose own float conversions are not.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Constants the kernel reads must be constexpr globals; the launcher reads their ``.value``.
# W kinds: how the stored tile is decoded and encoded; names as lorakit's codecs call them
FP32, FP16, BF16, E4M3, E5M2 = (tl.constexpr(i) for i in range(5))
KINDS = {"fp32": FP32.value, "fp16": FP16.value, "bf16": BF16.value, "e4m3": E4M3.value, "e5m2": E5M2.value}

# Tables (int64, row-major), built by the launcher in lorakit.kernels. Column indices by name:
#   layer row:   W address, source address (W itself, or a backup to re-patch from), rows, cols,
#                first segment, end segment, salt, index base (the flat index of W's first element in
#                the whole tensor, for the stochastic counter)
#   segment row: up address, down address, rank, first row, end row   (one LoRA on rows of one weight)
#   tile row (int32): layer, tile row, tile column
L_W, L_SRC, L_ROWS, L_COLS, L_SEG0, L_SEG1, L_SALT, L_IDX0 = (tl.constexpr(i) for i in range(8))
LAYER_COLS = tl.constexpr(8)
S_UP, S_DOWN, S_RANK, S_ROW0, S_ROW1 = (tl.constexpr(i) for i in range(5))
SEG_COLS = tl.constexpr(5)
T_LAYER, T_ROW, T_COL = (tl.constexpr(i) for i in range(3))
TILE_COLS = tl.constexpr(3)


@triton.jit
def _pow2(e):
    """2**e as fp32 for integer e in the normal range, built from its bits (exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


# fp8 formats by kind: (exponent bias, mantissa bits, largest finite value), passed to the kernel as constexprs
FP8_FORMATS = {E4M3.value: (7, 3, 448.0), E5M2.value: (15, 2, 57344.0)}


@triton.jit
def _fp8_decode(bits, KIND: tl.constexpr, BIAS: tl.constexpr, MBITS: tl.constexpr):
    """uint8/int32 fp8 bit patterns -> fp32 (exact); NaN patterns decode to NaN."""
    b = bits.to(tl.int32) & 0xFF
    mag = b & 0x7F
    ef = mag >> MBITS
    mf = mag & ((1 << MBITS) - 1)
    sig = tl.where(ef > 0, mf + (1 << MBITS), mf)
    val = sig.to(tl.float32) * _pow2(tl.maximum(ef, 1) - BIAS - MBITS)
    if KIND == E4M3:  # e4m3fn: S.1111.111 is NaN, no infinities
        special = mag == 0x7F
    else:  # e5m2: exponent field all ones is inf / NaN
        special = ef == 31
    nan = (val.to(tl.int32, bitcast=True) | 0x7FC00000).to(tl.float32, bitcast=True)
    val = tl.where(special, nan, val)
    return tl.where(b >= 0x80, -val, val)


@triton.jit
def _fp8_encode_magnitude(a, BIAS: tl.constexpr, MBITS: tl.constexpr):
    """Round-to-nearest-even of a finite fp32 magnitude 0 <= a <= max into 7 fp8 bits (int32)."""
    EMIN: tl.constexpr = 1 - BIAS
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, EMIN)
    y = a * _pow2(MBITS - e)  # exact: a power-of-two scale into [0, 2**(MBITS+1))
    r = (y + 8388608.0) - 8388608.0  # RTNE to an integer (valid below 2**23)
    # the carry of a round-up runs into the exponent field by itself
    return ((e - EMIN) << MBITS) + r.to(tl.int32)


@triton.jit
def _mix32(x):
    """lowbias32 (Wellons), on uint32: the mixer of lorakit.ops.rounding.uniform24."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _uniform24(salt, index):
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = (index >> 32).to(tl.uint32)
    h = _mix32(lo ^ salt)
    h = _mix32(h ^ (hi + 0x9E3779B9))
    return (h >> 8).to(tl.float32)


@triton.jit
def _round_fp8(target, changed, raw, salt, index, KIND: tl.constexpr, BIAS: tl.constexpr, MBITS: tl.constexpr,
               MAX: tl.constexpr, STOCHASTIC: tl.constexpr):
    """fp32 target -> stored fp8 bits, keeping ``raw`` wherever the stored value does not move."""
    a = tl.minimum(tl.abs(target), MAX)
    near = _fp8_encode_magnitude(a, BIAS, MBITS)
    if STOCHASTIC:
        nf = _fp8_decode(near, KIND, BIAS, MBITS)
        other = tl.maximum(tl.where(nf < a, near + 1, near - 1), 0)
        of = _fp8_decode(other, KIND, BIAS, MBITS)
        lo = tl.minimum(nf, of)
        hi = tl.maximum(nf, of)
        lo_bits = tl.where(nf < of, near, other)
        hi_bits = tl.where(nf < of, other, near)
        # exact comparison: u has 24 bits, hi - lo is a power of two, a - lo is exact (Sterbenz)
        go_up = _uniform24(salt, index) * (hi - lo) < (a - lo) * 16777216.0
        mag = tl.where(nf == a, near, tl.where(go_up, hi_bits, lo_bits))
        negative = target < 0
    else:
        mag = near
        negative = (target.to(tl.int32, bitcast=True) >> 31) != 0
    bits = tl.where(negative, mag | 0x80, mag)
    bits = tl.where(target != target, 0x7F, bits)
    moved = changed & (_fp8_decode(bits, KIND, BIAS, MBITS) != _fp8_decode(raw, KIND, BIAS, MBITS))
    return tl.where(moved, bits, raw.to(tl.int32))


@triton.jit
def _bf16_rtne(x):
    """fp32 -> bf16 bits (uint16), round-to-nearest-even; NaN -> canonical quiet NaN."""
    b = x.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, r).to(tl.uint16)


@triton.jit
def grouped_lowrank_kernel(
    tiles_ptr, layers_ptr, layer_scales_ptr, segs_ptr, seg_scales_ptr, out_of_range_ptr,
    W_KIND: tl.constexpr, FP8_BIAS: tl.constexpr, FP8_MBITS: tl.constexpr, FP8_MAX: tl.constexpr,
    F_DTYPE: tl.constexpr, HAS_WSCALE: tl.constexpr, STOCHASTIC: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = tiles_ptr + pid * TILE_COLS
    layer = tl.load(tile + T_LAYER).to(tl.int64)
    tm = tl.load(tile + T_ROW).to(tl.int64)
    tn = tl.load(tile + T_COL).to(tl.int64)
    row = layers_ptr + layer * LAYER_COLS
    w_addr = tl.load(row + L_W)
    src_addr = tl.load(row + L_SRC)
    rows = tl.load(row + L_ROWS)
    cols = tl.load(row + L_COLS)
    seg0 = tl.load(row + L_SEG0)
    seg1 = tl.load(row + L_SEG1)
    salt = tl.load(row + L_SALT).to(tl.uint32)
    idx0 = tl.load(row + L_IDX0)

    offs_m = tm * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = tn * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    in_m = offs_m < rows
    in_n = offs_n < cols
    mask = in_m[:, None] & in_n[None, :]
    offs = offs_m[:, None] * cols + offs_n[None, :]  # W is a contiguous [rows, cols] view

    if W_KIND == FP32:
        w_ptr = w_addr.to(tl.pointer_type(tl.float32))
        raw = tl.load(src_addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
        orig = raw
    elif W_KIND == FP16:
        w_ptr = w_addr.to(tl.pointer_type(tl.float16))
        raw = tl.load(src_addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0)
        orig = raw.to(tl.float32)
    elif W_KIND == BF16:
        w_ptr = w_addr.to(tl.pointer_type(tl.uint16))
        raw = tl.load(src_addr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        orig = (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        w_ptr = w_addr.to(tl.pointer_type(tl.uint8))
        raw = tl.load(src_addr.to(tl.pointer_type(tl.uint8)) + offs, mask=mask, other=0)
        orig = _fp8_decode(raw, W_KIND, FP8_BIAS, FP8_MBITS)
    if HAS_WSCALE:
        wscale = tl.load(layer_scales_ptr + layer)
        orig = orig * wscale

    v = orig
    for s in range(seg0, seg1):
        srow = segs_ptr + s * SEG_COLS
        r0 = tl.load(srow + S_ROW0)
        r1 = tl.load(srow + S_ROW1)
        scale = tl.load(seg_scales_ptr + s)
        # segments at scale 0 are skipped (adding 0 would turn -0.0 into +0.0), as are those whose rows miss the tile
        if (tm * BLOCK_M < r1) & ((tm + 1) * BLOCK_M > r0) & (scale != 0.0):
            up_ptr = tl.load(srow + S_UP).to(tl.pointer_type(F_DTYPE))
            down_ptr = tl.load(srow + S_DOWN).to(tl.pointer_type(F_DTYPE))
            rank = tl.load(srow + S_RANK)
            in_seg = (offs_m >= r0) & (offs_m < r1)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, rank, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
                in_k = offs_k < rank
                a = tl.load(up_ptr + (offs_m - r0)[:, None] * rank + offs_k[None, :],
                            mask=in_seg[:, None] & in_k[None, :], other=0.0)
                b = tl.load(down_ptr + offs_k[:, None] * cols + offs_n[None, :], mask=in_k[:, None] & in_n[None, :],
                            other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            # two roundings, as the reference: t * scale, then the add (launched without FMA fusion);
            # rows outside the segment keep v as it is
            v = tl.where(in_seg[:, None], v + acc * scale, v)

    changed = v != orig
    if HAS_WSCALE:
        target = tl.math.div_rn(v, wscale)
    else:
        target = v
    # count what the storage cannot hold: fp8 values clipped at the limit, inf / NaN elsewhere
    # (y - y is 0 for finite y and NaN for inf or NaN)
    if W_KIND == FP32:
        out = target
        y = out
    elif W_KIND == FP16:
        out = target.to(tl.float16)
        y = out.to(tl.float32)
    elif W_KIND == BF16:
        out = _bf16_rtne(target)
        y = (out.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        out = _round_fp8(target, changed, raw, salt, offs + idx0, W_KIND, FP8_BIAS, FP8_MBITS, FP8_MAX, STOCHASTIC)
        out = out.to(tl.uint8)
    if W_KIND >= E4M3:
        bad = (tl.abs(target) > FP8_MAX) & changed & mask
    else:
        bad = ((y - y) != (y - y)) & mask
    tl.atomic_add(out_of_range_ptr + layer, tl.sum(tl.sum(bad.to(tl.int32), axis=1), axis=0))
    tl.store(w_ptr + offs, out, mask=mask)
