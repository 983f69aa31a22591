"""Near-duplicate films: the same radiograph re-exported (re-encoded, rescaled, cropped or padded, brightness,
contrast or gamma changed, 8/16 bit, gray/RGB), told apart from look-alike films of other patients.

Three steps, each measured on phantoms (numbers in ``benchmarks/RESULTS.md``):

1. **Signature** (per image, in the decoding workers): constant padding is trimmed from the edges, the image is
   area-resized to ``SIGNATURE_SIZE`` pixels square and rank-normalised (each pixel replaced by its quantile, so
   any monotone change of brightness, contrast, gamma or bit depth leaves it unchanged). uint8, 9 KB per image:
   100,000 images hold 0.9 GB while the duplicates are searched.
2. **Candidates**: every signature is registered (affine, OpenCV's ECC) to the data set's mean chest, so that
   crops and borders no longer shift the anatomy; the shared anatomy is subtracted and ``imagehash``'s
   perceptual hash (256-bit pHash) of what is left is the index key. Each image's ``NEIGHBOURS`` nearest keys
   (exact Hamming search in a faiss binary index: memory grows with N, not N^2) are its candidates. pHash of the
   plain images is no index here: chest films share their anatomy, and 1,308 pairs of *different* phantom
   patients among 3,000 lay within 4 of 64 bits.
3. **Verification** of each candidate pair: the second signature is aligned to the first (affine ECC); a pair
   is a near-duplicate only if the alignment needs no rotation or shear (re-exports never rotate; a second
   exposure of the same patient almost always does) and the aligned images correlate at ``NEAR_THRESHOLD`` or
   more over their central 80%.

Limits (measured): JPEG re-encoding below quality ~50 can push a copy below the threshold, where it cannot be
told from a second exposure of the same patient in the same pose; such pairs are missed rather than invented.
The same holds for any JPEG of a very small image (under ~100 px a side, where one 8 x 8 JPEG block is a tenth
of the film).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

SIGNATURE_SIZE = 96  # pixels per side of the stored signature (uint8, rank-normalised)
INDEX_SIZE = 64  # pixels per side used for registration and the pHash key
HASH_SIZE = 16  # imagehash pHash side: 16 x 16 = 256 bits
NEIGHBOURS = 3  # candidates per image (nearest pHash keys): 3 found all 500 copies among 3,500 films
MAX_HASH_DISTANCE = 100  # of 256 bits: farther keys are never candidates (copies measured <= 74)
PREFILTER = 0.93  # correlation of the registered index images below which a candidate is dropped unverified
NEAR_THRESHOLD = 0.974  # aligned correlation at or above which a pair is a near-duplicate
MAX_SHEAR = 0.003  # off-diagonal of the aligning affine map (~0.17 degrees); copies measured <= 0.0019
SCALE_RANGE = (0.8, 1.25)  # per-axis scale of the aligning map: crops/borders of <= 5% a side, rescaling
MARGIN = 0.1  # fraction of each side left out of the correlation (edges differ after crops and padding)
_PAD_TOLERANCE = 4  # grey levels: a padding row/column spans at most this range
_MAX_TRIM = 0.1  # never trim more than this fraction of a side as padding
_ECC_CRITERIA = (3, 30, 1e-3)  # cv2.TERM_CRITERIA_COUNT | EPS, at most 30 iterations, epsilon


def signature(gray: np.ndarray) -> np.ndarray:
    """The near-duplicate signature of one decoded image.

    Args:
        gray: uint8 [H, W] decoded image.

    Returns:
        uint8 [SIGNATURE_SIZE ** 2]: padding trimmed, area-resized, rank-normalised.
    """
    import cv2

    trimmed = trim_padding(gray)
    # Area averaging to shrink; smooth interpolation to enlarge a small film (INTER_AREA enlarges in blocks, and
    # two sizes of one film would then differ in their blocks)
    shrink = min(trimmed.shape) >= SIGNATURE_SIZE
    small = cv2.resize(trimmed.astype(np.float32), (SIGNATURE_SIZE, SIGNATURE_SIZE),
                       interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return _quantiles(small).reshape(-1)


def _quantiles(values: np.ndarray) -> np.ndarray:
    """uint8 quantile (rank scaled to 0..255) of each value (grey levels); values within 1/16 level tie.

    A histogram over 1/16 grey levels instead of a sort (scipy's rankdata): 10x faster on 9,216 values.
    """
    levels = np.rint((values - values.min()) * 16).astype(np.int64).ravel()  # order only: shift to >= 0
    counts = np.bincount(levels, minlength=int(levels.max()) + 1)
    below = np.cumsum(counts) - counts  # values under each level
    ranks = below[levels] + (counts[levels] - 1) / 2  # mean 0-based rank of the tied values
    return np.rint(ranks * (255.0 / max(1, levels.size - 1))).astype(np.uint8).reshape(values.shape)


def trim_padding(gray: np.ndarray) -> np.ndarray:
    """``gray`` without the constant rows/columns an export may pad it with (at most 10% of a side each)."""
    h, w = gray.shape
    top = _padding(gray, int(h * _MAX_TRIM))
    bottom = _padding(gray[::-1], int(h * _MAX_TRIM))
    left = _padding(gray.T, int(w * _MAX_TRIM))
    right = _padding(gray.T[::-1], int(w * _MAX_TRIM))
    return gray[top:h - bottom, left:w - right]


def _padding(lines: np.ndarray, limit: int) -> int:
    """How many leading rows of ``lines`` are one constant value (within the tolerance)."""
    if limit <= 0:
        return 0
    head = lines[:limit].astype(np.int16)
    lo, hi = head.min(axis=1), head.max(axis=1)
    flat = (hi - lo) <= _PAD_TOLERANCE
    flat &= np.abs((lo + hi) / 2 - (lo[0] + hi[0]) / 2) <= _PAD_TOLERANCE  # the same value as the first row
    return int(np.argmin(flat)) if not flat.all() else limit


def find_pairs(signatures: np.ndarray, *, threshold: float = NEAR_THRESHOLD) -> Iterator[tuple[int, int, float]]:
    """Near-duplicate pairs among signatures (:func:`signature`).

    Args:
        signatures: uint8 [N, SIGNATURE_SIZE ** 2].
        threshold: aligned correlation at or above which a verified pair is reported.

    Yields:
        (a, b, similarity) with a < b, sorted by (a, b).
    """
    n = len(signatures)
    if n < 2:
        return
    images = _standardised(signatures)
    small = _resized(images, INDEX_SIZE)
    registered, warps = _registered(small)
    index = _central_unit_rows(registered)
    # cheap first: the registered images are already aligned to the mean chest
    pairs = [(a, b) for a, b in _nearest_keys(_hash_keys(registered)) if float(index[a] @ index[b]) >= PREFILTER]
    scale = SIGNATURE_SIZE / INDEX_SIZE
    sims = _threaded(lambda ab: _verify(images[ab[0]], images[ab[1]],
                                        _relative_warp(warps[ab[0]], warps[ab[1]], scale)), pairs)
    for (a, b), sim in zip(pairs, sims, strict=True):
        if sim >= threshold:
            yield a, b, sim


def _threaded(fn, items: list) -> list:
    """``[fn(x) for x in items]`` on one thread per core: OpenCV releases the GIL inside ECC and warps."""
    from concurrent.futures import ThreadPoolExecutor

    if len(items) < 64:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(fn, items, chunksize=32))


def _standardised(signatures: np.ndarray) -> np.ndarray:
    x = np.asarray(signatures, np.float32).reshape(-1, SIGNATURE_SIZE, SIGNATURE_SIZE)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    return x / np.maximum(x.std(axis=(1, 2), keepdims=True), 1e-6)


def _resized(images: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])


def _registered(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image warped onto the data set's mean image (affine ECC), and the warps [N, 2, 3] that did it."""
    import cv2

    template = cv2.GaussianBlur(images.mean(axis=0), (0, 0), 1.0)
    size = images.shape[1]
    identity = np.eye(2, 3, dtype=np.float32)
    warps = np.stack([w if w is not None else identity for w in _threaded(lambda im: _align(template, im), list(images))])
    out = np.stack([_warp(im, w, size) for im, w in zip(images, warps, strict=True)])
    return out, warps


def _relative_warp(warp_a: np.ndarray, warp_b: np.ndarray, scale: float) -> np.ndarray:
    """The map taking image a's pixels to image b's (both registered to one template), at ``scale`` x the size."""
    def full(w: np.ndarray) -> np.ndarray:
        return np.vstack([w, [0.0, 0.0, 1.0]])

    rel = (full(warp_b) @ np.linalg.inv(full(warp_a)))[:2].astype(np.float32)
    rel[:, 2] *= scale
    return rel


def _central_unit_rows(images: np.ndarray) -> np.ndarray:
    m = int(images.shape[1] * MARGIN)
    x = images[:, m:-m, m:-m].reshape(len(images), -1)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def _hash_keys(registered: np.ndarray) -> np.ndarray:
    """imagehash pHash of each registered image minus the mean one, packed into bytes [N, HASH_SIZE**2 / 8]."""
    import imagehash
    from PIL import Image

    m = int(registered.shape[1] * MARGIN)
    centre = registered[:, m:-m, m:-m]
    residual = centre - centre.mean(axis=0)  # what is left once the anatomy every chest shares is removed
    keys = []
    for r in residual:
        span = float(r.max() - r.min()) or 1.0
        u8 = np.rint((r - r.min()) * (255.0 / span)).astype(np.uint8)  # pHash takes an 8-bit image
        keys.append(np.packbits(imagehash.phash(Image.fromarray(u8), hash_size=HASH_SIZE).hash.ravel()))
    return np.stack(keys)


def _nearest_keys(keys: np.ndarray) -> list[tuple[int, int]]:
    """Unordered pairs (a < b) of each key with its NEIGHBOURS nearest keys within MAX_HASH_DISTANCE bits.

    Exact Hamming k-nearest-neighbour search with faiss's ``IndexBinaryFlat``: memory grows with N (the keys
    and k results per key), never N x N; 100,000 keys take about a minute on 2 cores.
    """
    import faiss

    n = len(keys)
    k = min(NEIGHBOURS + 1, n)  # +1: each key finds itself
    index = faiss.IndexBinaryFlat(keys.shape[1] * 8)
    index.add(np.ascontiguousarray(keys, dtype=np.uint8))
    dist, nearest = index.search(np.ascontiguousarray(keys, dtype=np.uint8), k)
    pairs: set[tuple[int, int]] = set()
    for a, (row_d, row_i) in enumerate(zip(dist.tolist(), nearest.tolist(), strict=True)):
        for d, b in zip(row_d, row_i, strict=True):
            if b != a and b >= 0 and d <= MAX_HASH_DISTANCE:
                pairs.add((min(a, b), max(a, b)))
    return sorted(pairs)


def _verify(a: np.ndarray, b: np.ndarray, start: np.ndarray) -> float:
    """Correlation of ``a`` and ``b`` after aligning ``b`` onto ``a``; 0 if the alignment is not a re-export's."""
    warp = _align(a, b, start)
    if warp is None:
        return 0.0
    shear = max(abs(float(warp[0, 1])), abs(float(warp[1, 0])))
    lo, hi = SCALE_RANGE
    if shear > MAX_SHEAR or not (lo <= warp[0, 0] <= hi and lo <= warp[1, 1] <= hi):
        return 0.0
    size = a.shape[0]
    m = int(size * MARGIN)
    aligned = _warp(b, warp, size)
    x, y = a[m:-m, m:-m].ravel(), aligned[m:-m, m:-m].ravel()
    x, y = x - x.mean(), y - y.mean()
    return round(float(x @ y / max(np.sqrt((x @ x) * (y @ y)), 1e-6)), 4)


def _align(template: np.ndarray, image: np.ndarray, start: np.ndarray | None = None) -> np.ndarray | None:
    """The affine map (2 x 3, OpenCV's inverse-map convention) that best aligns ``image`` to ``template``."""
    import cv2

    warp = np.eye(2, 3, dtype=np.float32) if start is None else start.astype(np.float32).copy()
    try:
        _, warp = cv2.findTransformECC(cv2.GaussianBlur(template, (0, 0), 1.0), cv2.GaussianBlur(image, (0, 0), 1.0),
                                       warp, cv2.MOTION_AFFINE, _ECC_CRITERIA, None, 1)
    except cv2.error:  # no convergence (e.g. a blank image): nothing to align
        return None
    return warp


def _warp(image: np.ndarray, warp: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.warpAffine(image, warp, (size, size), flags=cv2.INTER_LINEAR + cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)
