"""Bit packing of unsigned codes (LSB first), for common.codec's ids and quantised values. Pure numpy."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["BitPackError", "pack_bits", "unpack_bits"]


class BitPackError(ValueError):
    """Codes that do not fit the requested width."""


_WORD: dict[int, np.dtype[Any]] = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 3: np.dtype("<u4"), 4: np.dtype("<u4")}


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (each < 2^bits, bits <= 32) -> uint8 [ceil(len * bits / 8)], LSB first."""
    if not 1 <= bits <= 32:
        raise BitPackError(f"pack_bits supports 1..32 bits, got {bits}")
    flat = np.ascontiguousarray(codes).reshape(-1)
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >> bits):
        raise BitPackError(f"codes in [{int(flat.min())}, {int(flat.max())}] do not fit in {bits} unsigned bits")
    word = _WORD[(bits + 7) // 8]
    # each code's little-endian bytes -> its bits (LSB first) -> keep the low `bits` -> one bit stream
    planes = np.unpackbits(flat.astype(word).view(np.uint8).reshape(flat.size, word.itemsize), axis=1,
                           bitorder="little")
    return np.packbits(planes[:, :bits].reshape(-1), bitorder="little")


def unpack_bits(buf: np.ndarray, bit_offsets: np.ndarray, bits: int) -> np.ndarray:
    """The `bits`-wide (<= 32) unsigned field starting at each bit offset of `buf` (uint8). Returns uint32.

    Two 64-bit word gathers per field: the word holding its first bit and the next one.
    """
    raw = np.asarray(buf, dtype=np.uint8).reshape(-1)
    offsets = np.asarray(bit_offsets, dtype=np.int64)
    if bits == 8 and not (offsets & 7).any():  # byte-aligned: a plain gather
        return raw[offsets >> 3].astype(np.uint32)
    padded = np.zeros(((raw.size + 7) // 8 + 1) * 8, dtype=np.uint8)
    padded[: raw.size] = raw
    words = padded.view("<u8")
    at = offsets >> 6
    shift = (offsets & 63).astype(np.uint64)
    low = words[at] >> shift
    high = words[at + 1] << ((np.uint64(64) - shift) & np.uint64(63))
    high[shift == 0] = 0  # a shift by 64 is not "all out" in numpy; the field lies in one word
    return ((low | high) & np.uint64((1 << bits) - 1)).astype(np.uint32)
