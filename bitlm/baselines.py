"""Reference points for bits per byte: what standard compressors achieve on the same bytes."""

from __future__ import annotations

import bz2
import gzip
import lzma


def compressor_bpb(data: bytes) -> dict[str, float]:
    """Compressed size in bits per input byte for gzip -9, bz2 -9 and xz -9e."""
    if not data:
        raise ValueError("compressor_bpb: empty input")
    n = len(data)
    sizes = {
        "gzip-9": len(gzip.compress(data, compresslevel=9, mtime=0)),
        "bz2-9": len(bz2.compress(data, compresslevel=9)),
        "xz-9e": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
    }
    return {name: 8.0 * size / n for name, size in sizes.items()}
