"""Per-image statistics of a decoded film: quality flags (as cleanvision reports them) and the image features
the source-shortcut audit (:mod:`cxr_search.data.shortcuts`) reads from outside the lungs.

Flags are counted in the integrity report; none of them quarantines an image (only undecodable files and images
smaller than ``MIN_SIDE`` are unusable). Thresholds are in grey levels of the 8-bit decoded image.
"""

from __future__ import annotations

import numpy as np

MIN_SIDE = 8  # px: smaller images are unusable (quarantined); nothing of a chest is left
TINY_SIDE = 64  # px: flagged "tiny" below this (the study resized to 128)
MAX_ASPECT = 2.0  # long side / short side above which the aspect is "extreme" (films are 1-1.4)
CONSTANT_STD = 2.0  # grey-level standard deviation below which an image is "nearly constant"
DARK_P99 = 50  # 99th percentile below this: "very dark"
WASHED_OUT_P1 = 205  # 1st percentile above this: "washed out"
BLURRY_SHARPNESS = 0.03  # mean |Laplacian| / std at <= 256 px below this: "blurry" (phantoms: >= 0.057; sigma-3 px blur: ~0.02)
BORDER = 0.05  # fraction of a side in each border strip
CORNER = 0.12  # fraction of a side in each corner patch
FLAGS = ("nearly_constant", "very_dark", "washed_out", "blurry", "extreme_aspect", "tiny")
FLAG_TEXT = {
    "nearly_constant": "nearly constant (almost one grey level)",
    "very_dark": "very dark",
    "washed_out": "washed out (very bright)",
    "blurry": "blurry",
    "extreme_aspect": f"extreme aspect ratio (sides more than {MAX_ASPECT:g}:1)",
    "tiny": f"tiny (a side under {TINY_SIDE} px)",
}
# Image statistics outside the lung fields: the border strips, the corners and the global intensity.
STAT_NAMES = (
    "mean", "std", "p1", "p99",
    "border_top", "border_bottom", "border_left", "border_right",
    "corner_tl", "corner_tr", "corner_bl", "corner_br",
    "corner_tl_std", "corner_tr_std", "corner_bl_std", "corner_br_std",
    "sharpness",
)


def image_stats(gray: np.ndarray) -> dict[str, float]:
    """Intensity statistics of one decoded image (global, border strips, corners) and its sharpness.

    Args:
        gray: uint8 [H, W] (the statistics are fractions of the image: a shrunk copy gives nearly the same).

    Returns:
        dict with one float per name in ``STAT_NAMES``.
    """
    import cv2

    g = gray.astype(np.float32)
    h, w = g.shape
    bh, bw = max(1, round(BORDER * h)), max(1, round(BORDER * w))
    ch, cw = max(1, round(CORNER * h)), max(1, round(CORNER * w))
    cdf = np.cumsum(np.bincount(gray.ravel(), minlength=256)) / gray.size  # uint8: a histogram, not a sort
    p1, p99 = float(np.searchsorted(cdf, 0.01)), float(np.searchsorted(cdf, 0.99))
    corners = {"tl": g[:ch, :cw], "tr": g[:ch, -cw:], "bl": g[-ch:, :cw], "br": g[-ch:, -cw:]}
    stats = {
        "mean": float(g.mean()), "std": float(g.std()), "p1": float(p1), "p99": float(p99),
        "border_top": float(g[:bh].mean()), "border_bottom": float(g[-bh:].mean()),
        "border_left": float(g[:, :bw].mean()), "border_right": float(g[:, -bw:].mean()),
    }
    stats.update({f"corner_{k}": float(v.mean()) for k, v in corners.items()})
    stats.update({f"corner_{k}_std": float(v.std()) for k, v in corners.items()})
    scale = 256 / max(h, w)
    small = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA) \
        if scale < 1 else gray
    # Sharpness: mean absolute Laplacian relative to the contrast, at <= 256 px (independent of the image size).
    lap = cv2.Laplacian(small, cv2.CV_32F)
    stats["sharpness"] = float(np.abs(lap).mean() / max(stats["std"] if small is gray else float(small.std()), 1.0))
    return stats


def quality_flags(stats: dict[str, float], height: int, width: int) -> list[str]:
    """The quality flags (names in ``FLAGS``) an image with these statistics and size gets."""
    flags = []
    if stats["std"] < CONSTANT_STD:
        flags.append("nearly_constant")
    if stats["p99"] < DARK_P99:
        flags.append("very_dark")
    if stats["p1"] > WASHED_OUT_P1:
        flags.append("washed_out")
    if stats["std"] >= CONSTANT_STD and stats["sharpness"] < BLURRY_SHARPNESS:
        flags.append("blurry")
    if max(height, width) > MAX_ASPECT * min(height, width):
        flags.append("extreme_aspect")
    if min(height, width) < TINY_SIDE:
        flags.append("tiny")
    return flags
