"""The sparsity pattern as machine code: x86-64 AVX-512 straight-line code for y = W @ x, one 16-token
tile at a time, emitted from a CSR weight (the way LIBXSMM's sparse JIT and DeepSparse turn a
layer's nonzeros into instructions).

Why machine code: the generated C kernel (cpu_csr_source.py) reads per nonzero a column index, the
value and 4 vectors of x, and issues x prefetches, which on this Zen 4 is ~6 cycles a nonzero for
4 FMAs: load-bound. Here the pattern is in the code, so no index is read at run time, and a block
of R = 28 output rows keeps its 28 accumulators in registers: per column the block uses, x's 16
tokens are loaded once (one vector), and each nonzero is one FMA whose weight is a broadcast memory
operand. At 90% a column of a 28-row block holds ~2.9 nonzeros, so x is read once per ~3 FMAs.
C with the same straight-line form takes GCC minutes per layer (a statement per nonzero); the
encoder below takes ~0.1 s for 236K nonzeros.

Calling convention (System V): fn(x_tile, values, out, ntiles) with
- x_tile: the tile's x packed [K][16] fp32 (token j of column c at x_tile[c * 16 + j]);
- values: the segment's weight values fp32, in the order the code reads them;
- out: [rows of the segment][16] fp32, the products without bias or epilogue;
- ntiles: tiles to do; after each, x_tile advances K * 16 and out (rows) * 16 floats.
A program is S segments (row ranges balanced by nonzeros), each its own function, so S threads
each run a disjoint part of the code (one segment's code, not the layer's, streams through a core).

Registers: zmm0..27 accumulators, zmm28..31 x (rotating, so loads run ahead), rdi/rsi/rdx/rcx the
arguments, r8 the value cursor (disp8 * 4 reaches 256 values; it moves 256 ahead as needed). All
are caller-saved; vzeroupper before ret.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EMIT_VERSION = "x86-avx512-1"
ROWS_PER_BLOCK = 28           # accumulators in registers; zmm28..31 hold x
TILE = 16                     # tokens per tile: one zmm of fp32
_X0 = 28

# fixed instruction bytes
_LEA_R8 = bytes((0x4C, 0x8D, 0x86)) + (512).to_bytes(4, "little")        # lea r8, [rsi + 512]
_ADD_R8 = bytes((0x49, 0x81, 0xC0)) + (1024).to_bytes(4, "little")       # add r8, 1024
_SUB_RCX = bytes((0x48, 0x83, 0xE9, 0x01))                               # sub rcx, 1
_EPILOGUE = bytes((0xC5, 0xF8, 0x77, 0xC3))                              # vzeroupper; ret
_TEST_RCX = bytes((0x48, 0x85, 0xC9))                                    # test rcx, rcx
_RDI, _RDX = 7, 2


def _add_imm32(reg_modrm: int, imm: int) -> bytes:   # add rdi/rdx, imm32 (REX.W 81 /0)
    return bytes((0x48, 0x81, reg_modrm)) + int(imm).to_bytes(4, "little", signed=True)


def _evex_p0(reg: np.ndarray, rm_ext_b: int, rm_ext_x: np.ndarray | int, opmap: int) -> np.ndarray:
    """EVEX P0: inverted R, X, B, R' and the opcode map (1: 0F, 2: 0F38)."""
    r, rp = (reg >> 3) & 1, (reg >> 4) & 1
    return ((r ^ 1) << 7) | ((np.asarray(rm_ext_x) ^ 1) << 6) | ((rm_ext_b ^ 1) << 5) | ((rp ^ 1) << 4) | opmap


def _mem32(opcode: int, reg: np.ndarray, base: int, disp: np.ndarray) -> np.ndarray:
    """[n, 10] bytes of `opcode zmm(reg), [base + disp32]` (EVEX.512.0F.W0, no vvvv): vmovups."""
    reg = np.asarray(reg, np.int64)
    out = np.empty((reg.size, 10), np.uint8)
    out[:, 0] = 0x62
    out[:, 1] = _evex_p0(reg, 0, 0, 1)
    out[:, 2] = 0x7C                                 # W0, vvvv unused (1111), pp none
    out[:, 3] = 0x48                                 # 512-bit, V' unused
    out[:, 4] = opcode
    out[:, 5] = 0x80 | ((reg & 7) << 3) | base
    out[:, 6:10] = np.asarray(disp, np.int64).astype("<i4").view(np.uint8).reshape(-1, 4)
    return out


def _fma_bcast8(acc: np.ndarray, x: np.ndarray, disp8: np.ndarray) -> np.ndarray:
    """[n, 7] bytes of `vfmadd231ps zmm(acc), zmm(x), [r8 + disp8 * 4]{1to16}` (EVEX.512.66.0F38.W0 B8)."""
    out = np.empty((acc.size, 7), np.uint8)
    out[:, 0] = 0x62
    out[:, 1] = _evex_p0(acc, 1, 0, 2)               # base r8: B set
    out[:, 2] = ((~x & 15) << 3) | 4 | 1
    out[:, 3] = 0x40 | 0x10 | ((((x >> 4) & 1) ^ 1) << 3)   # 512-bit, broadcast, V'
    out[:, 4] = 0xB8
    out[:, 5] = 0x40 | ((acc & 7) << 3)              # mod 01 (disp8), rm = r8 & 7 = 0
    out[:, 6] = (disp8 & 0xFF).astype(np.uint8)
    return out


def _vpxord(z: np.ndarray) -> np.ndarray:
    """[n, 6] bytes of `vpxord zmm(z), zmm(z), zmm(z)` (EVEX.512.66.0F.W0 EF)."""
    z = np.asarray(z, np.int64)
    out = np.empty((z.size, 6), np.uint8)
    out[:, 0] = 0x62
    out[:, 1] = _evex_p0(z, (z >> 3) & 1, (z >> 4) & 1, 1)
    out[:, 2] = ((~z & 15) << 3) | 4 | 1
    out[:, 3] = 0x40 | ((((z >> 4) & 1) ^ 1) << 3)
    out[:, 4] = 0xEF
    out[:, 5] = 0xC0 | ((z & 7) << 3) | (z & 7)
    return out


def _segment_body(crow: np.ndarray, col: np.ndarray, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
    """(code bytes of one tile of rows [r0, r1), the order in which it reads the nonzeros)."""
    rows = np.repeat(np.arange(r0, r1), np.diff(crow[r0:r1 + 1]))
    p = np.arange(crow[r0], crow[r1])
    cols = col[crow[r0]:crow[r1]].astype(np.int64)
    blk = (rows - r0) // ROWS_PER_BLOCK
    order = np.lexsort((rows, cols, blk))              # by block, then column, then row
    rows, cols, blk, p = rows[order], cols[order], blk[order], p[order]
    nnz = p.size
    v = np.arange(nnz)
    first = np.ones(nnz, bool)                          # the first nonzero of a (block, column)
    first[1:] = (blk[1:] != blk[:-1]) | (cols[1:] != cols[:-1])
    ordinal = np.cumsum(first) - 1
    xreg = _X0 + (ordinal & 3)
    acc = (rows - r0) % ROWS_PER_BLOCK
    brow = np.arange(r1 - r0)                            # every row: zeroed and stored in its block
    bblk, bacc = brow // ROWS_PER_BLOCK, brow % ROWS_PER_BLOCK
    move = (v % 256 == 0) & (v > 0)                      # the value cursor moves 256 values ahead
    # events in program order: key = block, phase (0 zero, 1 body, 2 store), position
    keys = [(bblk << 34) | bacc,
            (blk[first] << 34) | (1 << 32) | (3 * v[first]),
            (blk[move] << 34) | (1 << 32) | (3 * v[move] + 1),
            (blk << 34) | (1 << 32) | (3 * v + 2),
            (bblk << 34) | (2 << 32) | bacc]
    pieces = [_vpxord(bacc),
              _mem32(0x10, xreg[first], _RDI, cols[first] * (TILE * 4)),
              np.frombuffer(_ADD_R8, np.uint8)[None].repeat(int(move.sum()), 0),
              _fma_bcast8(acc, xreg, (v % 256) - 128),
              _mem32(0x11, bacc, _RDX, brow * (TILE * 4))]
    key = np.concatenate(keys)
    lens = np.concatenate([np.full(len(k), pc.shape[1]) for k, pc in zip(keys, pieces)])
    order = np.argsort(key, kind="stable")
    offs = np.empty(key.size, np.int64)
    offs[order] = np.concatenate([[0], np.cumsum(lens[order])[:-1]]) if key.size else []
    code = np.empty(int(lens.sum()), np.uint8)
    start = 0
    for k, pc in zip(keys, pieces):
        o = offs[start:start + len(k)]
        if len(k):
            code[o[:, None] + np.arange(pc.shape[1])] = pc
        start += len(k)
    return code, p


@dataclass
class Program:
    """Machine code of S segments and what they read: `code` (bytes), `values` (fp32, all segments
    one after another), and per segment (code offset, values offset, first row, end row)."""
    code: bytes
    values: torch.Tensor
    segments: np.ndarray          # [S, 4] int64
    n: int
    k: int


def emit(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n: int, k: int, segments: int) -> Program:
    """The program of a [n, k] CSR weight, its rows in `segments` runs of about equal nonzeros."""
    segments = max(1, min(segments, n))
    crow_np = crow.to(torch.int64).numpy()
    col_np = col.to(torch.int64).numpy()
    vals = values.to(torch.float32).numpy()
    nnz = int(crow_np[-1])
    bounds = [0] + [int(np.searchsorted(crow_np, nnz * s / segments, side="left")) for s in range(1, segments)] + [n]
    bounds = np.maximum.accumulate(np.minimum(bounds, n))
    code, vparts, table = bytearray(), [], []
    voff = 0
    for s in range(segments):
        r0, r1 = int(bounds[s]), int(bounds[s + 1])
        body, order = _segment_body(crow_np, col_np, r0, r1)
        table.append((len(code), voff, r0, r1))
        # fn(x, values, out, ntiles): a loop over tiles around the body
        code += _TEST_RCX + b"\x0f\x8e" + (0).to_bytes(4, "little")   # jle done (patched below)
        jle_at = len(code) - 4
        code += _LEA_R8
        loop = len(code)
        code += body.tobytes()
        code += _add_imm32(0xC7, k * TILE * 4) + _add_imm32(0xC2, (r1 - r0) * TILE * 4) + _LEA_R8 + _SUB_RCX
        code += b"\x0f\x85" + (loop - (len(code) + 6)).to_bytes(4, "little", signed=True)   # jnz loop
        code[jle_at:jle_at + 4] = (len(code) - (jle_at + 4)).to_bytes(4, "little", signed=True)
        code += _EPILOGUE
        vparts.append(vals[order])
        voff += order.size
    allv = np.concatenate(vparts) if vparts else np.zeros(0, np.float32)
    return Program(bytes(code), torch.from_numpy(np.ascontiguousarray(allv, np.float32)),
                   np.asarray(table, np.int64).reshape(-1, 4), n, k)
