"""Simulated per-client acquisition (scanner) heterogeneity: feature-distribution skew.

Each client is given one :class:`AcquisitionShift` - the settings of "its scanner" - and every
image that client holds (train and held-out alike) is passed through it on the host, after
partitioning. That makes it combinable with any label or quantity skew.

Transforms, in the fixed order :func:`apply_shift` applies them (acquisition geometry first,
then the detector response, then electronic noise, so the noise stays white):

1. resolution: area-average down to ``round(n / downsample)`` cells per in-plane axis, then
   linear interpolation (half-pixel aligned, edge-clamped) back to ``n``. In-plane axes are
   both spatial axes of 2D images and ``H, W`` of 3D volumes; depth is ``slice_thickness``'s.
2. slice thickness (3D ``[N, D, H, W, C]`` only): average non-overlapping groups of ``t``
   adjacent slices (slices ``[0, t), [t, 2t), ...``; the last group holds the remaining
   ``D mod t`` slices when ``t`` does not divide ``D`` and is their plain mean), giving
   ``ceil(D / t)`` slices. ``"pad"`` (PPPML-HMI, RAD-ChestCT) then appends zero slices back to
   ``D``; ``"repeat"`` repeats each thick slice ``t`` times and crops to ``D``.
3. blur: Gaussian with ``blur_sigma`` pixels (voxels) on every spatial axis, reflecting edges.
4. contrast: gamma on the data's value range ``[lo, hi]``: ``u = clip((x - lo) / (hi - lo),
   0, 1)``, ``x = lo + (hi - lo) * u ** gamma``. jaxfl images are in ``[-1, 1]``
   (:func:`jaxfl.data.normalize_images`), the default range.
5. intensity: ``x * scale + offset`` (offset in data units).
6. noise: ``x + noise_std * N(0, 1)``, drawn from a numpy Generator seeded with
   ``(seed, stream, client_id)``.

Label maps (a segmentation ``mask``) must stay on their image's grid: steps 1 and 3-6 keep
every pixel where it is, but slice thickness moves anatomy along depth (thick slice ``j`` shows
slices ``[jt, (j+1)t)``). :func:`shift_labels` gives the labels that go with a shifted volume:
each thick slice takes the labels of its group's middle slice (the slice it is centred on), and
``"pad"``'s appended slices are labelled ``ignore_label`` (no anatomy, nothing to learn).
:func:`apply_to_clients` applies it to the features named in ``label_keys``.

A parameter at its identity value skips its step, so the identity shift returns the input
exactly. In ``"pad"`` mode steps 3-6 run on the ``ceil(D / t)`` averaged slices (blur's depth
sigma then counts thick slices) and the padding is appended last, so the padded slices are
exactly zero whatever else the shift does; blur would otherwise smear them into the image and
gamma, offset and noise would make them non-zero. Zero is PPPML-HMI's fill value; in jaxfl's
``[-1, 1]`` scaling it is mid-gray.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.ndimage

from jaxfl.data.lazy import is_lazy
from jaxfl.types import ClientArrays

SLICE_MODES = ("pad", "repeat")
# The value range of jaxfl's normalized images (ToTensor then Normalize(0.5, 0.5)).
DEFAULT_VALUE_RANGE = (-1.0, 1.0)
# Noise streams for apply_to_clients, so a client's train and held-out noise differ.
TRAIN_STREAM = 0
HELDOUT_STREAM = 1
# PPPML-HMI's RAD-ChestCT setup: client i averages (1, 5, 10)[i % 3] adjacent slices.
PPPML_HMI_THICKNESSES = (1, 5, 10)
# Slice thicknesses sample_shifts draws from for 3D data.
SAMPLED_THICKNESSES = (1, 5, 10)

# Seed-sequence salts keep these draws independent of other uses of the same run seed
# (e.g. split_heldout seeds its shuffle with [seed, client_id]).
_NOISE_SALT = 0x5CA7
_SAMPLE_SALT = 0x5A4E


@dataclasses.dataclass(frozen=True)
class AcquisitionShift:
    """One client's acquisition settings; every default is the identity.

    ``scale > 0`` and ``offset``: intensity gain and bias (data units); ``gamma > 0``: contrast
    exponent on the value range; ``blur_sigma >= 0``: Gaussian PSF width in pixels;
    ``noise_std >= 0``: additive Gaussian noise std (data units); ``downsample >= 1``: in-plane
    resolution loss factor; ``slice_thickness``: integer >= 1, slices averaged (3D only);
    ``slice_mode``: ``"pad"`` or ``"repeat"``.
    """

    scale: float = 1.0
    offset: float = 0.0
    gamma: float = 1.0
    blur_sigma: float = 0.0
    noise_std: float = 0.0
    downsample: float = 1.0
    slice_thickness: int = 1
    slice_mode: str = "pad"

    def __post_init__(self) -> None:
        for name in ("scale", "offset", "gamma", "blur_sigma", "noise_std", "downsample"):
            object.__setattr__(self, name, _finite_float(name, getattr(self, name)))
        if self.scale <= 0:
            raise ValueError(
                f"scale must be > 0 (a gain; 1 = unchanged), got {self.scale}; "
                "use offset for a bias"
            )
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0 (1 = unchanged), got {self.gamma}")
        if self.blur_sigma < 0:
            raise ValueError(f"blur_sigma must be >= 0 pixels (0 = no blur), got {self.blur_sigma}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0 (0 = no noise), got {self.noise_std}")
        if self.downsample < 1:
            raise ValueError(
                f"downsample must be >= 1 (1 = full resolution, 2 = half), got {self.downsample}"
            )
        t = self.slice_thickness
        integral = isinstance(t, (int, np.integer)) or (isinstance(t, float) and t.is_integer())
        if isinstance(t, bool) or not integral or t < 1:
            raise ValueError(
                f"slice_thickness must be an integer >= 1 (slices averaged; 1 = unchanged), "
                f"got {t!r}"
            )
        object.__setattr__(self, "slice_thickness", int(t))
        if self.slice_mode not in SLICE_MODES:
            raise ValueError(f"slice_mode must be one of {SLICE_MODES}, got {self.slice_mode!r}")

    @property
    def is_identity(self) -> bool:
        """Whether this shift leaves images unchanged (``slice_mode`` alone changes nothing)."""
        return dataclasses.replace(self, slice_mode="pad") == AcquisitionShift()


FIELDS = tuple(f.name for f in dataclasses.fields(AcquisitionShift))


def _finite_float(name: str, value: Any) -> float:
    """``value`` as a finite float, or a ValueError naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _check_value_range(value_range: Sequence[float]) -> tuple[float, float]:
    """``value_range`` as floats ``(lo, hi)``, or a ValueError if it is not a finite interval."""
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(
            f"value_range must be finite (lo, hi) with lo < hi, got {tuple(value_range)}; "
            f"jaxfl images use {DEFAULT_VALUE_RANGE}"
        )
    return lo, hi


def _resample_matrix(n: int, factor: float) -> np.ndarray:
    """``[n, n]`` operator: area-average to ``round(n / factor)`` cells, linear back to ``n``.

    Every row is a convex combination (non-negative weights summing to 1), so constants are
    preserved and values never leave the input's range.
    """
    m = max(1, round(n / factor))
    edges = np.linspace(0.0, n, m + 1)
    pixels = np.arange(n, dtype=np.float64)
    overlap = np.minimum(edges[1:, None], pixels + 1) - np.maximum(edges[:-1, None], pixels)
    down = np.clip(overlap, 0.0, None) / np.diff(edges)[:, None]  # [m, n]
    # Input pixel centers in low-resolution cell coordinates (cell centers at 0, 1, ...).
    pos = np.clip((pixels + 0.5) * m / n - 0.5, 0.0, m - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, m - 1)
    frac = pos - i0
    up = np.zeros((n, m))
    np.add.at(up, (np.arange(n), i0), 1.0 - frac)
    np.add.at(up, (np.arange(n), i1), frac)
    return up @ down


def resample(images: np.ndarray, factor: float, axes: Sequence[int]) -> np.ndarray:
    """Lose resolution by ``factor`` along ``axes`` of ``images``; shape and dtype are kept.

    Area-averages down to ``round(n / factor)`` cells, then linearly interpolates back to
    ``n`` (half-pixel aligned, edge-clamped). ``factor == 1`` returns the input unchanged.
    """
    if factor == 1:
        return images
    out = images
    for a in axes:
        op = _resample_matrix(images.shape[a], factor).astype(images.dtype)
        out = np.moveaxis(np.moveaxis(out, a, -1) @ op.T, -1, a)
    return np.ascontiguousarray(out)


def average_slices(volumes: np.ndarray, thickness: int) -> np.ndarray:
    """``[N, D, H, W, C]`` -> ``[N, ceil(D / t), H, W, C]`` means of ``t`` adjacent slices.

    Groups are ``[0, t), [t, 2t), ...``; the last group holds the ``D mod t`` leftover slices
    when ``t`` does not divide ``D`` and is their mean.
    """
    starts = np.arange(0, volumes.shape[1], thickness)
    sizes = np.diff(np.append(starts, volumes.shape[1])).astype(volumes.dtype)
    sums = np.add.reduceat(volumes, starts, axis=1)
    return sums / sizes.reshape(1, -1, *([1] * (volumes.ndim - 2)))


def _pad_slices(volumes: np.ndarray, depth: int) -> np.ndarray:
    """Zero slices appended along axis 1 up to ``depth`` (PPPML-HMI's padding)."""
    pad = [(0, 0)] * volumes.ndim
    pad[1] = (0, depth - volumes.shape[1])
    return np.pad(volumes, pad)


def slice_thickness(volumes: np.ndarray, thickness: int, mode: str = "pad") -> np.ndarray:
    """Simulate thick slices on ``[N, D, H, W, C]`` volumes; the shape is kept.

    Averages groups of ``thickness`` adjacent slices (see :func:`average_slices`), then
    ``"pad"`` zero-pads the ``ceil(D / t)`` averaged slices back to ``D`` (PPPML-HMI) and
    ``"repeat"`` repeats each averaged slice ``t`` times, cropped to ``D``. ``t = 1`` is the
    identity.
    """
    _check_volumes(volumes, thickness)
    if mode not in SLICE_MODES:
        raise ValueError(f"slice_mode must be one of {SLICE_MODES}, got {mode!r}")
    if thickness == 1:
        return volumes
    thick = average_slices(volumes, thickness)
    if mode == "pad":
        return _pad_slices(thick, volumes.shape[1])
    return np.repeat(thick, thickness, axis=1)[:, : volumes.shape[1]]


def _check_volumes(images: np.ndarray, thickness: int) -> None:
    """Raise unless ``thickness`` is 1 or ``images`` are ``[N, D, H, W, C]`` volumes."""
    if thickness != 1 and images.ndim != 5:
        raise ValueError(
            f"slice_thickness={thickness} needs 3D volumes [N, D, H, W, C], got images of "
            f"shape {images.shape}; set slice_thickness to 1 for 2D data"
        )


def apply_shift(
    images: np.ndarray,
    shift: AcquisitionShift,
    *,
    seed: int,
    client_id: int = 0,
    stream: int = 0,
    value_range: Sequence[float] = DEFAULT_VALUE_RANGE,
) -> np.ndarray:
    """Pass ``images [N, *spatial, C]`` through one client's scanner; returns float32, same shape.

    Steps and their order are in the module docstring. Deterministic: the noise comes from a
    Generator seeded with ``(seed, stream, client_id)``. ``value_range`` is the data's
    ``(lo, hi)``, used only by gamma.
    """
    x = np.asarray(images)
    if x.ndim < 3:
        raise ValueError(
            f"images must be [N, *spatial, C] with at least one spatial axis, got shape {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"images must be floating point (normalized), got {x.dtype}; "
            "normalize them first (jaxfl.data.normalize_images)"
        )
    _check_volumes(x, shift.slice_thickness)
    lo, hi = _check_value_range(value_range)
    x = x.astype(np.float32, copy=True)
    spatial = tuple(range(1, x.ndim - 1))

    x = resample(x, shift.downsample, spatial[-2:])
    depth = x.shape[1]
    if shift.slice_thickness != 1:
        if shift.slice_mode == "pad":
            x = average_slices(x, shift.slice_thickness)
        else:
            x = slice_thickness(x, shift.slice_thickness, "repeat")
    if shift.blur_sigma > 0:
        sigma = [shift.blur_sigma if a in spatial else 0.0 for a in range(x.ndim)]
        x = scipy.ndimage.gaussian_filter(x, sigma=sigma, mode="reflect")
    if shift.gamma != 1:
        u = np.clip((x - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
        x = np.float32(lo) + np.float32(hi - lo) * u ** np.float32(shift.gamma)
    if shift.scale != 1 or shift.offset != 0:
        x = x * np.float32(shift.scale) + np.float32(shift.offset)
    if shift.noise_std > 0:
        rng = np.random.default_rng([_NOISE_SALT, int(seed), int(stream), int(client_id)])
        x = x + np.float32(shift.noise_std) * rng.standard_normal(x.shape, dtype=np.float32)
    if x.shape[1] != depth:
        x = _pad_slices(x, depth)
    return x.astype(np.float32, copy=False)


def shift_labels(labels: np.ndarray, shift: AcquisitionShift, ignore_label: int = -1) -> np.ndarray:
    """The label maps ``[N, *spatial]`` that stay aligned with ``apply_shift``'s output.

    Only slice thickness moves anatomy (module docstring); for 2D labels, or thickness 1, the
    labels are returned unchanged. 3D labels are ``[N, D, H, W]``.
    """
    t = shift.slice_thickness
    if t == 1:
        return labels
    if labels.ndim != 4:
        raise ValueError(
            f"slice_thickness={t} needs 3D label maps [N, D, H, W], got shape {labels.shape}"
        )
    depth = labels.shape[1]
    starts = np.arange(0, depth, t)
    middles = starts + (np.minimum(starts + t, depth) - starts - 1) // 2
    thick = labels[:, middles]
    if shift.slice_mode == "repeat":
        return np.repeat(thick, t, axis=1)[:, :depth]
    pad = np.full((labels.shape[0], depth - thick.shape[1], *labels.shape[2:]), ignore_label)
    return np.concatenate([thick, pad.astype(labels.dtype)], axis=1)


def apply_to_clients(
    arrays: ClientArrays,
    shifts: Sequence[AcquisitionShift],
    *,
    seed: int,
    stream: int = TRAIN_STREAM,
    value_range: Sequence[float] = DEFAULT_VALUE_RANGE,
    label_keys: Sequence[str] = (),
    ignore_label: int = -1,
) -> ClientArrays:
    """Client ``k``'s shift applied to its real images ``arrays.examples["image"][k, :counts[k]]``.

    The images are ``[K, N, *spatial, C]``; the features in ``label_keys`` (label maps
    ``[K, N, *spatial]``) follow them through :func:`shift_labels`; padding rows, other
    features, mask and counts are returned untouched. Use the same ``shifts`` and ``seed`` for
    a client's train and held-out arrays (same scanner) with different ``stream``
    (``TRAIN_STREAM`` / ``HELDOUT_STREAM``) so their noise draws differ.
    """
    missing = [k for k in label_keys if k not in arrays.examples]
    if missing:
        raise ValueError(f"label_keys {missing} are not features of {sorted(arrays.examples)}")
    counts = np.asarray(arrays.counts)
    k = counts.shape[0]
    if len(shifts) != k:
        raise ValueError(
            f"got {len(shifts)} shifts for {k} clients; pass exactly one AcquisitionShift per "
            "client (identity AcquisitionShift() for an unshifted client)"
        )
    if is_lazy(arrays.examples["image"]):
        return _apply_lazily(arrays, shifts, seed, stream, value_range, label_keys, ignore_label)
    labels = {k: np.array(arrays.examples[k], copy=True) for k in label_keys}
    images = np.asarray(arrays.examples["image"])
    out = images.astype(np.float32, copy=True)
    for c, shift in enumerate(shifts):
        n = int(counts[c])
        if n == 0 or shift.is_identity:
            continue
        try:
            out[c, :n] = apply_shift(
                images[c, :n],
                shift,
                seed=seed,
                client_id=c,
                stream=stream,
                value_range=value_range,
            )
            for v in labels.values():
                v[c, :n] = shift_labels(v[c, :n], shift, ignore_label)
        except ValueError as e:
            raise ValueError(f"client {c}: {e}") from None
    return arrays._replace(examples={**arrays.examples, **labels, "image": out})


def _apply_lazily(
    arrays: ClientArrays,
    shifts: Sequence[AcquisitionShift],
    seed: int,
    stream: int,
    value_range: Sequence[float],
    label_keys: Sequence[str],
    ignore_label: int,
) -> ClientArrays:
    """:func:`apply_to_clients` on lazy features: each client's shift runs when its rows are
    read (the same values: a client's draws depend only on seed, client and stream). Each
    shifted client's first example is shifted now, so a shift that cannot apply fails here."""

    def shift_images(c: int, x: np.ndarray) -> np.ndarray:
        if shifts[c].is_identity:
            return x
        kw = dict(seed=seed, client_id=c, stream=stream, value_range=value_range)
        return apply_shift(x, shifts[c], **kw)

    def shift_mask(c: int, x: np.ndarray) -> np.ndarray:
        return x if shifts[c].is_identity else shift_labels(x, shifts[c], ignore_label)

    examples = dict(arrays.examples)
    examples["image"] = examples["image"].map_clients(shift_images, np.float32)
    for key in label_keys:
        examples[key] = examples[key].map_clients(shift_mask)
    counts = np.asarray(arrays.counts)
    for c, shift in enumerate(shifts):
        if shift.is_identity or counts[c] == 0:
            continue
        row = examples["image"].index[c, :1]
        try:
            shift_images(c, np.asarray(examples["image"].source[row], np.float32))
        except ValueError as e:
            raise ValueError(f"client {c}: {e}") from None
    return arrays._replace(examples=examples)


def scanner_presets(
    num_clients: int,
    thicknesses: Sequence[int] = PPPML_HMI_THICKNESSES,
    *,
    slice_mode: str = "pad",
) -> list[AcquisitionShift]:
    """PPPML-HMI's three-scanner setup: client ``i`` averages ``thicknesses[i % len]`` slices.

    With the defaults and 3 clients this is RAD-ChestCT's 1 / 5 / 10 slice groups, zero-padded.
    """
    _check_num_clients(num_clients)
    if not thicknesses:
        raise ValueError("thicknesses is empty; pass e.g. (1, 5, 10)")
    return [
        AcquisitionShift(slice_thickness=thicknesses[i % len(thicknesses)], slice_mode=slice_mode)
        for i in range(num_clients)
    ]


def _check_num_clients(num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")


# Fields sample_shifts draws; each takes a strength in [0, 1].
STRENGTH_FIELDS = (
    "scale",
    "offset",
    "gamma",
    "blur_sigma",
    "noise_std",
    "downsample",
    "slice_thickness",
)


def _strengths(strength: float | Mapping[str, float], is_3d: bool) -> dict[str, float]:
    """Per-field strengths in [0, 1] from a scalar (every field) or a partial mapping."""
    if isinstance(strength, Mapping):
        unknown = sorted(set(strength) - set(STRENGTH_FIELDS))
        if unknown:
            raise ValueError(
                f"strength has unknown fields {unknown}; valid fields are {STRENGTH_FIELDS}"
            )
        out = {f: _finite_float(f"strength[{f!r}]", strength.get(f, 0.0)) for f in STRENGTH_FIELDS}
        if not is_3d and out["slice_thickness"] > 0:
            raise ValueError(
                "strength['slice_thickness'] > 0 needs 3D volumes; drop it for 2D data"
            )
    else:
        s = _finite_float("strength", strength)
        out = dict.fromkeys(STRENGTH_FIELDS, s)
        if not is_3d:
            out["slice_thickness"] = 0.0
    for f, s in out.items():
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"strength for {f} must be in [0, 1] (0 = identity), got {s}")
    return out


def sample_shifts(
    num_clients: int,
    seed: int,
    strength: float | Mapping[str, float],
    *,
    is_3d: bool = False,
    slice_mode: str = "pad",
) -> list[AcquisitionShift]:
    """Draw one random :class:`AcquisitionShift` per client; ``strength`` 0 gives identities.

    ``strength`` is a scalar ``s`` in [0, 1] for every field, or a mapping field -> strength
    (missing fields 0). With ``u ~ U[0, 1)`` per field and client, the draws are:
    scale ``1 + 0.5 s (2u - 1)`` (in ``[1 - s/2, 1 + s/2]``); offset ``0.2 s (2u - 1)``;
    gamma ``exp(s (2u - 1))`` (log-uniform in ``[e^-s, e^s]``); blur_sigma ``1.5 s u`` px;
    noise_std ``0.1 s u``; downsample uniform over ``{1, ..., 1 + floor(3 s)}`` (``{1..4}`` at
    ``s = 1``); slice_thickness (3D only; a scalar strength leaves 2D data at 1) uniform over
    ``{1, 5, 10}`` entries ``<= 1 + 9 s``. Client ``k`` is drawn from ``(seed, k)`` alone, so
    adding clients does not change the others' shifts.
    """
    _check_num_clients(num_clients)
    s = _strengths(strength, is_3d)
    shifts = []
    for k in range(num_clients):
        u = np.random.default_rng([_SAMPLE_SALT, int(seed), k]).random(len(STRENGTH_FIELDS))
        u = dict(zip(STRENGTH_FIELDS, u.tolist(), strict=True))
        sizes = list(range(1, 2 + math.floor(3 * s["downsample"])))
        thick = [t for t in SAMPLED_THICKNESSES if t <= 1 + 9 * s["slice_thickness"]]
        shifts.append(
            AcquisitionShift(
                scale=1.0 + 0.5 * s["scale"] * (2 * u["scale"] - 1),
                offset=0.2 * s["offset"] * (2 * u["offset"] - 1),
                gamma=math.exp(s["gamma"] * (2 * u["gamma"] - 1)),
                blur_sigma=1.5 * s["blur_sigma"] * u["blur_sigma"],
                noise_std=0.1 * s["noise_std"] * u["noise_std"],
                downsample=float(sizes[int(u["downsample"] * len(sizes))]),
                slice_thickness=thick[int(u["slice_thickness"] * len(thick))],
                slice_mode=slice_mode,
            )
        )
    return shifts


def _as_dict(obj: Any) -> Any:
    """ConfigDicts (anything with ``to_dict``) as plain dicts; other objects unchanged."""
    return obj.to_dict() if hasattr(obj, "to_dict") else obj


_SPEC_KEYS = ("strength", "seed", "slice_mode", "preset")
PRESETS = ("pppml_hmi",)


def shifts_from_config(
    spec: Any, num_clients: int, *, is_3d: bool, seed: int = 0
) -> list[AcquisitionShift]:
    """One validated :class:`AcquisitionShift` per client from a config value.

    ``spec`` is one of: ``None`` (every client identity); a list of ``num_clients`` dicts of
    :class:`AcquisitionShift` fields (explicit per client, missing fields identity); a dict
    ``{"strength": s or {field: s}, "seed"?: int (default ``seed``), "slice_mode"?: str}``
    passed to :func:`sample_shifts`; or ``{"preset": "pppml_hmi", "slice_mode"?: str}`` for
    :func:`scanner_presets`. ``is_3d`` says whether images are ``[N, D, H, W, C]`` volumes;
    slice thickness on 2D data is rejected here, before any data is touched.
    """
    _check_num_clients(num_clients)
    spec = _as_dict(spec)
    if spec is None:
        return [AcquisitionShift() for _ in range(num_clients)]
    if isinstance(spec, Mapping):
        return _shifts_from_spec(spec, num_clients, is_3d, seed)
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        if len(spec) != num_clients:
            raise ValueError(
                f"heterogeneity lists {len(spec)} per-client settings for {num_clients} clients; "
                "give exactly one dict per client ({} for an unshifted client)"
            )
        return [_client_shift(_as_dict(entry), c, is_3d) for c, entry in enumerate(spec)]
    raise ValueError(
        f"heterogeneity spec must be None, a list of per-client dicts, or a dict with "
        f"'strength' or 'preset'; got {type(spec).__name__}"
    )


def _shifts_from_spec(
    spec: Mapping[str, Any], num_clients: int, is_3d: bool, seed: int
) -> list[AcquisitionShift]:
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    if unknown:
        raise ValueError(
            f"heterogeneity spec has unknown keys {unknown}; valid keys are {_SPEC_KEYS} "
            "(per-client fields go in a list of dicts, one per client)"
        )
    slice_mode = spec.get("slice_mode", "pad")
    if ("strength" in spec) == ("preset" in spec):
        raise ValueError(
            "heterogeneity spec needs exactly one of 'strength' (random shifts) or 'preset' "
            f"(one of {PRESETS}); got keys {sorted(spec)}"
        )
    if "preset" in spec:
        if spec["preset"] not in PRESETS:
            raise ValueError(f"heterogeneity preset {spec['preset']!r}; choose one of {PRESETS}")
        if not is_3d:
            raise ValueError(
                "heterogeneity preset 'pppml_hmi' sets slice_thickness, which needs 3D volumes; "
                "use a 3D dataset or a 'strength' spec for 2D data"
            )
        return scanner_presets(num_clients, slice_mode=slice_mode)
    strength = _as_dict(spec["strength"])
    try:
        return sample_shifts(
            num_clients, spec.get("seed", seed), strength, is_3d=is_3d, slice_mode=slice_mode
        )
    except ValueError as e:
        raise ValueError(f"heterogeneity strength spec: {e}") from None


def _client_shift(entry: Any, client: int, is_3d: bool) -> AcquisitionShift:
    """Client ``client``'s explicit settings as a validated shift; errors name the client."""
    if not isinstance(entry, Mapping):
        raise ValueError(
            f"heterogeneity client {client}: expected a dict of fields {FIELDS}, got "
            f"{type(entry).__name__}"
        )
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        raise ValueError(
            f"heterogeneity client {client}: unknown fields {unknown}; valid fields are "
            f"{FIELDS}. Fix the spelling."
        )
    try:
        shift = AcquisitionShift(**entry)
    except ValueError as e:
        raise ValueError(f"heterogeneity client {client}: {e}") from None
    if not is_3d and shift.slice_thickness != 1:
        raise ValueError(
            f"heterogeneity client {client}: slice_thickness={shift.slice_thickness} needs 3D "
            "volumes but the data is 2D; remove slice_thickness (or set it to 1)"
        )
    return shift
