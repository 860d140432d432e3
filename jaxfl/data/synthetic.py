"""Synthetic stand-in for MedMNIST, written in exactly the official raw ``.npz`` format.

Each class has a smooth random prototype (a low-pass-filtered Gaussian field, periodic). An
example is its class prototype with a random amplitude and a random circular shift, plus a
class-independent smooth "anatomy" field with random weight and white Gaussian pixel noise,
mapped to uint8. Small CNNs learn it quickly; at high ``noise`` a linear probe does not reach
100%. No real data is involved, so tests and CI can run without downloads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxfl.data.medmnist import REQUIRED_KEYS, arrays_to_dataset
from jaxfl.types import Dataset

# Intensities are built in [0, 1] around mid-gray; CONTRAST scales the unit-std class signal.
_MID_GRAY = 0.5
_CONTRAST = 0.15
_AMPLITUDE_RANGE = (0.6, 1.4)  # per-example multiplier of the class prototype
_BACKGROUND_STD = 0.8  # per-example weight std of the shared, class-independent field
_CUTOFF_CYCLES = 3.0  # Gaussian low-pass width, in cycles per image side
_MAX_SHIFT_FRACTION = 0.25  # shifts up to ±25% of each side (±7 px at 28)


def parse_image_shape(image_shape: Sequence[int]) -> tuple[tuple[int, ...], int, bool]:
    """``image_shape`` -> (spatial dims, channels, is_3d).

    ``(H, W)`` or ``(H, W, 1)``: gray 2D; ``(H, W, 3)``: RGB 2D; ``(D, H, W)`` with
    ``W not in (1, 3)`` or ``(D, H, W, 1)``: 3D volume.
    """
    try:
        shape = tuple(int(s) for s in image_shape)
    except (TypeError, ValueError):
        raise ValueError(f"image_shape must be a tuple of ints, got {image_shape!r}") from None
    if any(s < 1 for s in shape):
        raise ValueError(f"image_shape entries must be >= 1, got {shape}")
    if len(shape) == 2:
        return shape, 1, False
    if len(shape) == 3 and shape[-1] in (1, 3):
        return shape[:2], shape[-1], False
    if len(shape) == 3:
        return shape, 1, True
    if len(shape) == 4 and shape[-1] == 1:
        return shape[:3], 1, True
    raise ValueError(
        f"image_shape {shape} is not understood; use (H, W) or (H, W, 1) for gray, "
        "(H, W, 3) for RGB, or (D, H, W) / (D, H, W, 1) for 3D volumes"
    )


def _smooth_fields(
    rng: np.random.Generator, count: int, spatial: tuple[int, ...], channels: int
) -> np.ndarray:
    """``count`` zero-mean unit-std low-frequency periodic fields ``[count, *spatial, C]``."""
    axes = tuple(range(1, len(spatial) + 1))
    white = rng.standard_normal((count, *spatial, channels))
    # Squared frequency (cycles per image side) on the FFT grid, broadcast over all axes.
    freq2 = sum(
        np.reshape(
            np.fft.fftfreq(n, d=1.0 / n) ** 2, [-1 if i == a else 1 for i in range(len(spatial))]
        )
        for a, n in enumerate(spatial)
    )
    gain = np.exp(-freq2 / (2.0 * _CUTOFF_CYCLES**2))
    gain.flat[0] = 0.0  # drop the mean so prototypes differ by pattern, not brightness
    spectrum = np.fft.fftn(white, axes=axes) * gain[None, ..., None]
    fields = np.real(np.fft.ifftn(spectrum, axes=axes))
    std = fields.std(axis=axes, keepdims=True)
    return fields / np.maximum(std, 1e-12)


def _roll_each(x: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Circularly shift each example ``x[i]`` by ``shifts[i]`` along its spatial axes."""
    n, nd = shifts.shape
    for a in range(nd):
        size = x.shape[a + 1]
        idx = (np.arange(size)[None, :] - shifts[:, a : a + 1]) % size  # [n, size]
        idx = idx.reshape((n,) + tuple(size if i == a else 1 for i in range(nd)) + (1,))
        x = np.take_along_axis(x, idx, axis=a + 1)
    return x


def _make_split(
    rng: np.random.Generator,
    n: int,
    prototypes: np.ndarray,
    background: np.ndarray,
    noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One split: float images in [0, 1] ``[n, *spatial, C]`` and balanced int labels ``[n]``."""
    num_classes, spatial = prototypes.shape[0], prototypes.shape[1:-1]
    # Balanced labels in random order: every class appears once n >= num_classes.
    labels = rng.permutation(np.arange(n) % num_classes)
    amp = rng.uniform(*_AMPLITUDE_RANGE, size=n)
    max_shift = np.array([max(1, round(_MAX_SHIFT_FRACTION * s)) for s in spatial])
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n, len(spatial)))
    bg_weight = rng.normal(0.0, _BACKGROUND_STD, size=n)
    bcast = (n,) + (1,) * (prototypes.ndim - 1)
    signal = amp.reshape(bcast) * _roll_each(prototypes[labels], shifts)
    signal = signal + bg_weight.reshape(bcast) * background[None]
    pixels = _MID_GRAY + _CONTRAST * signal + noise * rng.standard_normal(signal.shape)
    return pixels, labels


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Float intensities in [0, 1] -> uint8, clipped like a saturating sensor."""
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def make_synthetic_arrays(
    num_classes: int = 8,
    image_shape: Sequence[int] = (28, 28, 3),
    n_train: int = 2000,
    n_val: int = 400,
    n_test: int = 800,
    seed: int = 0,
    noise: float = 0.1,
) -> dict[str, np.ndarray]:
    """Raw MedMNIST-format dict: uint8 images ``[N, H, W]``/``[N, H, W, 3]``/``[N, D, H, W]``,
    uint8 labels ``[N, 1]``, for the train/val/test splits.

    ``noise`` is the std of per-pixel Gaussian noise in [0, 1] intensity units (the class
    signal has std 0.15). Measured with the defaults (8 classes, 2000 train): RGB 28x28 at
    noise 0.1, a 2-block CNN reaches ~96-98% test accuracy in 2-3 epochs and logistic
    regression ~99%; at noise 0.3 logistic regression drops to ~84% (CNN ~89% after 5
    epochs); gray 28x28 at noise 0.1: logistic ~70%, CNN ~91% after 5 epochs.
    """
    if isinstance(num_classes, bool) or not 2 <= int(num_classes) <= 256:
        raise ValueError(
            f"num_classes must be an int in [2, 256] (uint8 labels), got {num_classes}"
        )
    for arg, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(value, bool) or int(value) < 0:
            raise ValueError(f"{arg} must be a non-negative int, got {value!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0 (std in [0, 1] intensity units), got {noise!r}")
    spatial, channels, _ = parse_image_shape(image_shape)

    rng = np.random.default_rng(seed)
    # Prototypes are drawn first, so all splits (and every n_*) share the same classes.
    prototypes = _smooth_fields(rng, int(num_classes), spatial, channels)
    background = _smooth_fields(rng, 1, spatial, channels)[0]
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        pixels, labels = _make_split(rng, int(n), prototypes, background, float(noise))
        images = _to_uint8(pixels)
        if channels == 1:
            images = images[..., 0]  # official gray 2D and all 3D files have no channel axis
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.astype(np.uint8).reshape(-1, 1)
    return arrays


def synthetic_dataset(
    num_classes: int = 8,
    image_shape: Sequence[int] = (28, 28, 3),
    n_train: int = 2000,
    n_val: int = 400,
    n_test: int = 800,
    seed: int = 0,
    noise: float = 0.1,
    name: str = "synthetic",
) -> Dataset:
    """Synthetic :class:`Dataset` through the same converter as real MedMNIST files."""
    arrays = make_synthetic_arrays(num_classes, image_shape, n_train, n_val, n_test, seed, noise)
    _, _, is_3d = parse_image_shape(image_shape)
    return arrays_to_dataset(
        arrays, name, is_3d=is_3d, num_classes=int(num_classes), source=f"synthetic {name!r}"
    )


def write_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> Path:
    """Write a raw MedMNIST-format dict to ``path`` (compressed npz, like the official files)."""
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise ValueError(
            f"arrays lacks keys {missing}; a MedMNIST file needs {list(REQUIRED_KEYS)}"
        )
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"path must end in '.npz' (np.savez would append it), got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{k: np.asarray(v) for k, v in arrays.items()})
    return path
