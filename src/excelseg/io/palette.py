"""The label palette: class id → colour (PASCAL VOC's colour map) and the ignore index.

Masks are palette ("P" mode) PNGs with the PASCAL VOC palette (:data:`VOC_PALETTE`; index = class id,
:data:`IGNORE_INDEX` 255 = ignore).
"""

from __future__ import annotations

import numpy as np

__all__ = ["IGNORE_INDEX", "VOC_PALETTE", "voc_palette"]

IGNORE_INDEX = 255


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map, ``(n, 3)`` uint8.

    Colour of index ``i``: the bits of ``i`` are dealt out three at a time (bit 0 → red, bit 1 → green,
    bit 2 → blue, then the next three bits, …), each triple landing one bit lower in the colour bytes, starting
    at bit 7. Index 1 → (128, 0, 0), 15 → (192, 128, 128), 255 → (224, 224, 192), VOC's boundary colour.
    """
    idx = np.arange(n, dtype=np.int64)
    pal = np.zeros((n, 3), dtype=np.int64)
    for j in range(8):  # up to 24 bits of the index, 3 per round
        shift = 3 * j
        for ch in range(3):
            bit = (idx >> (shift + ch)) & 1
            pal[:, ch] |= bit << (7 - j)
    return pal.astype(np.uint8)


#: The standard 256-entry PASCAL VOC palette, ``(256, 3)`` uint8 (read-only).
VOC_PALETTE: np.ndarray = voc_palette(256)
VOC_PALETTE.setflags(write=False)
