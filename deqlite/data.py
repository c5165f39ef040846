"""Data that ships with installed packages or is generated: no downloads.

* :func:`camera_image`: scikit-image's bundled ``camera`` photograph, resized, in [-1, 1],
  with pixel coordinates in [-1, 1]^2, for implicit neural representations (chapter 5).
* :func:`load_digits_tensors`: scikit-learn's bundled 8x8 digits as standardised tensors.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._checks import check_int

__all__ = ["camera_image", "image_coordinates", "load_digits_tensors", "pan_windows"]


def image_coordinates(size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Pixel-centre coordinates of a ``size x size`` grid in [-1, 1]^2, row-major.

    Returns: ``(size * size, 2)`` with columns (x, y) = (column, row) positions.

    Example:
        >>> image_coordinates(2).tolist()
        [[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]
    """
    check_int("size", size, lo=2)
    t = torch.linspace(-1.0, 1.0, size, dtype=dtype)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def camera_image(size: int = 64, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """scikit-image's ``camera`` (512x512 grey photograph, shipped in the wheel), resized with
    anti-aliasing to ``size x size`` and scaled to [-1, 1].

    Returns:
        ``(coords, pixels)``: coordinates ``(size*size, 2)`` in [-1, 1]^2 (row-major, see
        :func:`image_coordinates`) and values ``(size*size, 1)`` in [-1, 1].
        ``pixels.reshape(size, size)`` is the image.

    Example:
        >>> coords, pixels = camera_image(16)
        >>> coords.shape, pixels.shape, bool(pixels.abs().max() <= 1)
        (torch.Size([256, 2]), torch.Size([256, 1]), True)
    """
    check_int("size", size, lo=2, hi=512, hint="the photograph is 512x512")
    from skimage import data as skdata
    from skimage.transform import resize

    img = skdata.camera().astype(np.float64) / 255.0  # (512, 512) in [0, 1]
    if size != img.shape[0]:
        img = resize(img, (size, size), anti_aliasing=True, preserve_range=True)
    pixels = torch.as_tensor(np.clip(img * 2.0 - 1.0, -1.0, 1.0), dtype=dtype).reshape(-1, 1)
    return image_coordinates(size, dtype), pixels


def load_digits_tensors(test_size: float = 0.25, seed: int = 0,
                        dtype: torch.dtype = torch.float32
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes, bundled), split into
    train and test sets (stratified) and standardised with the training mean and std.

    Returns:
        ``(X_train, y_train, X_test, y_test)``: ``X`` of shape ``(N, 64)`` (``dtype``),
        ``y`` of shape ``(N,)`` (int64 labels 0-9).

    Example:
        >>> Xtr, ytr, Xte, yte = load_digits_tensors()
        >>> Xtr.shape, Xte.shape, int(ytr.max())
        (torch.Size([1347, 64]), torch.Size([450, 64]), 9)
    """
    if not (isinstance(test_size, float) and 0.0 < test_size < 1.0):
        raise ValueError(f"test_size must be a float in (0, 1), e.g. 0.25, got {test_size!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=seed,
                                          stratify=y)
    mean = Xtr.mean(axis=0)
    std = Xtr.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # corner pixels are always 0: leave them at 0
    to = lambda a: torch.as_tensor((a - mean) / std, dtype=dtype)
    return (to(Xtr), torch.as_tensor(ytr, dtype=torch.long), to(Xte),
            torch.as_tensor(yte, dtype=torch.long))


def pan_windows(size: int, window: int, n_frames: int, step: int = 1) -> list:
    """Index sets of a square window panning right across a ``size x size`` row-major grid:
    a sequence of related inputs (like consecutive video frames) for fixed-point reuse.

    Returns: ``n_frames`` long tensors of shape ``(window * window,)``; frame ``t`` covers
    rows ``[r0, r0 + window)`` and columns ``[t * step, t * step + window)``, with the window
    centred vertically. Index ``coords[idx]`` and ``pixels[idx]`` with them.

    Example:
        >>> [w.tolist() for w in pan_windows(3, 2, 2)]
        [[0, 1, 3, 4], [1, 2, 4, 5]]
    """
    for name, v in (("size", size), ("window", window), ("n_frames", n_frames), ("step", step)):
        check_int(name, v)
    if window + step * (n_frames - 1) > size:
        raise ValueError(f"the window leaves the image: window + step * (n_frames - 1) = "
                         f"{window + step * (n_frames - 1)} > size = {size}; use fewer frames, a "
                         f"smaller step or a smaller window")
    r0 = (size - window) // 2
    rows = torch.arange(r0, r0 + window)
    out = []
    for t in range(n_frames):
        cols = torch.arange(t * step, t * step + window)
        out.append((rows[:, None] * size + cols[None, :]).reshape(-1))
    return out
