"""Batched on-device augmentation: the study's random rotation, shear and zoom as ONE affine warp per batch.

The study used Keras' ImageDataGenerator, which warps images one at a time on the CPU. Here every sample of a
batch gets its own random affine matrix (built exactly as Keras composes it: rotation @ shear @ zoom) and the
whole batch is warped by one ``F.affine_grid`` + ``F.grid_sample`` call on the tensors' device, so a GPU never
waits for a CPU data loader.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine_matrices(
    n: int,
    *,
    rotation_deg: float,
    shear_deg: float,
    zoom: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``n`` random Keras-style affine matrices in pixel-centred coordinates.

    Each matrix maps an output pixel position (relative to the image centre) to the input position it samples,
    as Keras' ``apply_affine_transform`` does: ``rotation(theta) @ shear(phi) @ zoom(zx, zy)`` with
    ``theta ~ U(-rotation_deg, rotation_deg)``, ``phi ~ U(-shear_deg, shear_deg)`` and ``zx, zy`` drawn
    independently from ``U(1 - zoom, 1 + zoom)``.

    Args:
        n: number of matrices (one per sample).
        rotation_deg: maximum absolute rotation, degrees.
        shear_deg: maximum absolute shear angle, degrees.
        zoom: maximum zoom deviation, fraction (0.1 means a factor in 0.9..1.1 per axis).
        device: where to draw and return the matrices.
        generator: random generator on ``device``; the global torch RNG when None.

    Returns:
        float32 tensor [n, 2, 2].
    """
    u = torch.rand(n, 4, device=device, generator=generator, dtype=torch.float32) * 2 - 1  # U(-1, 1)
    theta = u[:, 0] * math.radians(rotation_deg)
    phi = u[:, 1] * math.radians(shear_deg)
    zx = 1 + u[:, 2] * zoom
    zy = 1 + u[:, 3] * zoom
    cos_t, sin_t = torch.cos(theta), torch.sin(theta)
    rotation = torch.stack([torch.stack([cos_t, -sin_t], -1), torch.stack([sin_t, cos_t], -1)], -2)
    zeros, ones = torch.zeros_like(phi), torch.ones_like(phi)
    shear = torch.stack(
        [torch.stack([ones, -torch.sin(phi)], -1), torch.stack([zeros, torch.cos(phi)], -1)], -2
    )
    scale = torch.stack([torch.stack([zx, zeros], -1), torch.stack([zeros, zy], -1)], -2)
    return rotation @ shear @ scale


def warp(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Warp a batch with per-sample 2x2 matrices about the centre (bilinear; edges repeat as Keras' 'nearest').

    Args:
        images: floating tensor [N, C, H, W].
        matrices: [N, 2, 2] output-to-input maps in pixel units (from ``random_affine_matrices``).

    Returns:
        tensor of the same shape, dtype and device as ``images``.
    """
    n, _, h, w = images.shape
    # affine_grid works in normalised coordinates ([-1, 1] across each axis); convert the pixel-unit matrix so
    # rotations stay rotations on non-square images: theta = D^-1 A D with D = diag(w/2, h/2).
    to_pixels = torch.tensor([w / 2, h / 2], device=images.device, dtype=torch.float32)
    linear = matrices.to(torch.float32) * to_pixels[None, None, :] / to_pixels[None, :, None]
    theta = torch.cat([linear, torch.zeros(n, 2, 1, device=images.device)], dim=2).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment_batch(
    images: torch.Tensor,
    *,
    rotation_deg: float,
    shear_deg: float,
    zoom: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Randomly rotate, shear and zoom every image of a batch, each with its own transform, in one warp.

    Args:
        images: floating tensor [N, C, H, W] on any device.
        rotation_deg: maximum absolute rotation, degrees.
        shear_deg: maximum absolute shear angle, degrees.
        zoom: maximum zoom deviation, fraction.
        generator: random generator on the images' device; the global torch RNG when None.

    Returns:
        the augmented batch: same shape, dtype and device.
    """
    if not images.is_floating_point():
        raise TypeError(
            f"augment_batch needs a floating tensor, got {images.dtype}; convert uint8 images first."
        )
    matrices = random_affine_matrices(
        images.shape[0],
        rotation_deg=rotation_deg,
        shear_deg=shear_deg,
        zoom=zoom,
        device=images.device,
        generator=generator,
    )
    return warp(images, matrices)
