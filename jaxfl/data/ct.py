"""CT slices for 2D segmentation: NIfTI volumes or 2D slice files -> windowed axial slices.

numpy (plus nibabel, scipy.ndimage and PIL) only: nothing here imports JAX. One case (image,
mask, optional lung mask) goes through :func:`load_case`:

1. read. NIfTI volumes are reoriented with ``nib.as_closest_canonical`` (RAS+) and viewed as a
   stack of axial slices ``[Z, H, W]``: Z runs inferior -> superior, rows anterior -> posterior,
   columns patient right -> left. That is the radiological display convention, the one 2D slice
   collections (PNG/JPG image + PNG mask, one slice per file) are stored in, so slices from both
   kinds of file look alike. Spacing comes from the canonical header's zooms.
2. check. A mask (and a lung mask) must lie on its image's voxel grid: same shape and affine.
3. :func:`preprocess_volume`, which synthetic phantoms (:mod:`jaxfl.data.phantoms`) also enter:
   keep all slices, or with ``lung_only`` those where the lung is non-zero (a lung-mask file, or
   ``lung_labels`` of the mask); resample in-plane to ``size`` (image linear, masks nearest so
   labels stay integers); map intensities to [-1, 1] (HU through a window, or 0-255 grey levels
   linearly, see :func:`detect_intensity`); remap labels with ``label_map``.

Layouts (:func:`discover_covid19_ct_seg`, :func:`discover_msd`, :func:`read_manifest`) turn a
folder or a CSV into :class:`CaseSpec` rows; :func:`load_cases` preprocesses them into one
:class:`SliceSet`, cached on disk as ``.npz`` when given a ``cache_dir``. The split helpers work
on whole patients, and every patient belongs to exactly one site, so no patient's slices land in
two splits or two clients.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import scipy.ndimage
from nibabel.filebasedimages import ImageFileError
from PIL import Image

from jaxfl.data.medmnist import MissingDataError, normalize_images, resolve_data_dir
from jaxfl.errors import ConfigError, DataFileError

# Lung window (level -600 HU, width 1500 HU -> [-1350, 150] HU onto [-1, 1]): air (-1000 HU)
# stays below lung parenchyma (~-850), ground glass (-700..-300) and consolidation (-100..50)
# spread over most of the range, and soft tissue sits near the top.
LUNG_WINDOW_LEVEL = -600.0
LUNG_WINDOW_WIDTH = 1500.0
INTENSITY_MODES = ("auto", "hu", "grey")
# 8-bit grey levels: the range :func:`detect_intensity` reads as "already windowed".
GREY_MAX = 255.0
# A mask whose affine differs from its image's by less than this fraction of the smallest voxel
# spacing is on the same grid: headers store affines in float32, so exact equality is too strict.
AFFINE_TOLERANCE_VOXELS = 0.01
# slice_index of a slice read from a 2D file: it has no position in a volume.
NO_SLICE_INDEX = -1
CACHE_VERSION = 1
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SLICE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Lossy JPEG would turn label edges into new labels, so slice masks must be lossless.
SLICE_MASK_SUFFIXES = (".png",)
MANIFEST_REQUIRED = ("image", "mask", "patient", "site")

COVID_CT_SEG_RECORD = "3757476"
COVID_CT_SEG_URL = f"https://zenodo.org/records/{COVID_CT_SEG_RECORD}"
MSD_URL = "http://medicaldecathlon.com/"
TOTALSEG_EXAMPLE_IMAGE = "totalseg_example_ct_sm.nii.gz"
TOTALSEG_EXAMPLE_SEG = "totalseg_example_seg.nii.gz"
TOTALSEG_URL = "https://github.com/wasserth/TotalSegmentator (tests/reference_files/)"
TOTALSEG_LIVER = 5
TOTALSEG_LUNG_LABELS = (10, 11, 12, 13, 14)

# COVID-19-CT-Seg file names (Zenodo 3757476; the Kaggle copy has the same names as .nii).
# Some copies name three coronacases images coronacases_org_case007 etc.; both spellings match.
_CORONA_IMAGE = re.compile(r"coronacases_org_(?:case)?(\d+)\.nii(?:\.gz)?", re.IGNORECASE)
_CORONA_MASK = re.compile(r"coronacases_(\d+)\.nii(?:\.gz)?", re.IGNORECASE)
_RADIO_IMAGE = re.compile(
    r"radiopaedia_org_covid-19-pneumonia-(\d+)_(\d+)_(\d+)-dcm\.nii(?:\.gz)?", re.IGNORECASE
)
_RADIO_MASK = re.compile(r"radiopaedia_(\d+)_(\d+)_(\d+)\.nii(?:\.gz)?", re.IGNORECASE)
# nnU-Net channel suffix: imagesTr/NAME_0000.nii.gz.
_NNUNET_CHANNEL = re.compile(r"(.+)_(\d{4})")

# Seed-sequence salts keep split draws independent of other uses of the same seed.
_SPLIT_SALT = 0x5B17
_SITE_SALT = 0x517E


class MissingCTDataError(MissingDataError):
    """A CT dataset is not where jaxfl looked; the message gives the download and the layout."""


class CaseSpec(NamedTuple):
    """One case: image and mask files (NIfTI volumes, or one 2D slice each), who and where.

    ``split`` is a predefined split name (manifest column) or None; ``lung`` an optional lung
    mask file on the image's grid, used by ``lung_only``.
    """

    image: Path
    mask: Path
    patient: str
    site: str
    split: str | None = None
    lung: Path | None = None


class Volume(NamedTuple):
    """A canonical NIfTI volume as axial slices.

    ``data [Z, H, W]`` float32 (see the module docstring for the axis directions),
    ``spacing (dz, dh, dw)`` in mm, ``affine`` the canonical (RAS+) voxel -> world matrix.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray


class SliceSet(NamedTuple):
    """Preprocessed slices: the engine's input. All numpy.

    ``image [N, H, W, 1]`` float32 in [-1, 1]; ``mask [N, H, W]`` int32 class labels
    (0 = background); ``patient [N]`` and ``site [N]`` int32 indices into ``patients`` and
    ``sites``; ``slice_index [N]`` int32 axial index in its volume (``NO_SLICE_INDEX`` for a
    slice read from a 2D file). Subsets keep the full ``patients`` / ``sites`` tuples, so
    indices mean the same thing in every split.
    """

    image: np.ndarray
    mask: np.ndarray
    patient: np.ndarray
    site: np.ndarray
    slice_index: np.ndarray
    patients: tuple[str, ...]
    sites: tuple[str, ...]

    @property
    def num_slices(self) -> int:
        """Number of slices N."""
        return int(self.image.shape[0])

    def select(self, indices: Any) -> SliceSet:
        """The slices at ``indices`` (int array or boolean mask [N]); see :func:`take`."""
        return take(self, indices)


@dataclasses.dataclass(frozen=True)
class CTPreprocess:
    """How a case becomes slices; every field is part of the cache key.

    ``size``: in-plane ``(H, W)`` to resample to, or None to keep each file's own size.
    ``window_level`` / ``window_width``: HU window mapped onto [-1, 1] (default: lung window).
    ``intensity``: ``"auto"`` (:func:`detect_intensity` per volume), ``"hu"`` or ``"grey"``.
    ``label_map``: raw label -> class (labels not listed become 0), or None to keep labels.
    ``lung_only``: keep only slices where the lung is non-zero: the case's lung-mask file, or
    with ``lung_labels`` any of those raw labels of the mask (e.g. TotalSegmentator's 10-14).
    """

    size: tuple[int, int] | None = None
    window_level: float = LUNG_WINDOW_LEVEL
    window_width: float = LUNG_WINDOW_WIDTH
    intensity: str = "auto"
    label_map: tuple[tuple[int, int], ...] | None = None
    lung_only: bool = False
    lung_labels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Accept a dict for label_map and any sequences, stored as sorted tuples so that equal
        # configs hash (and cache) alike.
        if self.size is not None:
            size = tuple(int(s) for s in self.size)
            if len(size) != 2 or min(size) < 1:
                raise ConfigError(f"CTPreprocess.size must be (H, W) > 0 or None, got {self.size}")
            object.__setattr__(self, "size", size)
        if self.label_map is not None:
            pairs = (
                self.label_map.items() if isinstance(self.label_map, Mapping) else self.label_map
            )
            label_map = tuple(sorted((int(s), int(d)) for s, d in pairs))
            if any(s < 0 or d < 0 for s, d in label_map):
                raise ConfigError(f"CTPreprocess.label_map labels must be >= 0, got {label_map}")
            object.__setattr__(self, "label_map", label_map)
        object.__setattr__(self, "lung_labels", tuple(sorted(int(x) for x in self.lung_labels)))
        if not self.window_width > 0:
            raise ConfigError(f"CTPreprocess.window_width must be > 0 HU, got {self.window_width}")
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(
                f"CTPreprocess.intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}"
            )
        if self.lung_labels and not self.lung_only:
            raise ConfigError(
                "CTPreprocess.lung_labels only defines the lung for lung_only; set lung_only=True "
                "or drop lung_labels"
            )


# --------------------------------------------------------------------------- reading volumes


def canonical_to_slices(data: np.ndarray) -> np.ndarray:
    """Canonical RAS+ array ``[X, Y, Z]`` -> axial slices ``[Z, H=Y, W=X]`` in display order.

    Rows run anterior -> posterior and columns patient right -> left (both axes flipped).
    """
    return np.ascontiguousarray(np.transpose(data[::-1, ::-1, :], (2, 1, 0)))


def slices_to_canonical(stack: np.ndarray) -> np.ndarray:
    """Inverse of :func:`canonical_to_slices`: ``[Z, H, W]`` -> RAS+ ``[X, Y, Z]``."""
    return np.ascontiguousarray(np.transpose(stack, (2, 1, 0))[::-1, ::-1, :])


def _nifti_stem(path: Path) -> str | None:
    """File name without ``.nii`` / ``.nii.gz``, or None for another kind of file."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def load_volume(path: str | os.PathLike[str]) -> Volume:
    """Read a 3D NIfTI file as canonical axial slices ``[Z, H, W]`` float32 plus spacing."""
    path = Path(path)
    if not path.is_file():
        raise MissingCTDataError(f"NIfTI file not found: {path}")
    try:
        img = nib.as_closest_canonical(nib.load(path))
        data = img.get_fdata(dtype=np.float32)
    except (OSError, EOFError, ValueError, ImageFileError) as err:
        raise DataFileError(
            f"could not read {path} as NIfTI ({err}); the file may be truncated or not NIfTI"
        ) from err
    # A trailing singleton axis ([X, Y, Z, 1]) is a 3D volume saved as 4D.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataFileError(
            f"{path} has shape {data.shape}; jaxfl's CT path takes one 3D volume per file "
            "(split multi-channel or 4D series into one file per volume)"
        )
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Volume(
        data=canonical_to_slices(data),
        spacing=(zooms[2], zooms[1], zooms[0]),
        affine=np.asarray(img.affine, np.float64),
    )


def check_same_grid(image: Volume, mask: Volume, image_path: Path, mask_path: Path) -> None:
    """Raise DataFileError naming both files unless ``mask`` lies on ``image``'s voxel grid."""
    if mask.data.shape != image.data.shape:
        raise DataFileError(
            f"mask {mask_path} has shape {mask.data.shape} (Z, H, W) but its image {image_path} "
            f"has {image.data.shape}; the mask must be on the image's voxel grid. Is it the mask "
            "of another scan, or was one of them resampled?"
        )
    tol = AFFINE_TOLERANCE_VOXELS * min(image.spacing)
    diff = float(np.max(np.abs(mask.affine - image.affine)))
    if diff > tol:
        raise DataFileError(
            f"mask {mask_path} and image {image_path} have the same shape but different "
            f"affines (voxel -> world, up to {diff:.3g} mm apart; tolerance {tol:.3g} mm):\n"
            f"image:\n{np.array2string(image.affine, precision=3)}\n"
            f"mask:\n{np.array2string(mask.affine, precision=3)}\n"
            "the mask must be on the image's voxel grid; re-export it from the image's series"
        )


def _as_labels(mask: np.ndarray, source: str) -> np.ndarray:
    """A mask as int32 labels; float masks must hold whole non-negative numbers."""
    mask = np.asarray(mask)
    whole = np.issubdtype(mask.dtype, np.integer) or np.all(np.isfinite(mask) & (mask % 1 == 0))
    if not whole:
        raise DataFileError(
            f"{source} holds non-integer values; a mask must hold class labels "
            "(is it a probability map, or an image given as mask?)"
        )
    if mask.size and mask.min() < 0:
        raise DataFileError(f"{source} holds negative labels (min {mask.min()}); expected >= 0")
    return mask.astype(np.int32)


# --------------------------------------------------------------------------- preprocessing


def detect_intensity(volume: np.ndarray, source: str = "volume") -> str:
    """``"grey"`` for 0-255 grey levels, ``"hu"`` for Hounsfield units.

    Rule: any value below 0 or above 255 -> HU (CT in HU always holds air at about -1000);
    otherwise, with a maximum above 1 -> grey levels already windowed, as in the
    COVID-19-CT-Seg Radiopaedia volumes. Values all inside [0, 1] are neither (a normalised
    image, or a mask given as image) and raise DataFileError.
    """
    lo, hi = float(np.min(volume)), float(np.max(volume))
    if lo < 0.0 or hi > GREY_MAX:
        return "hu"
    if hi > 1.0:
        return "grey"
    raise DataFileError(
        f"{source}: every value lies in [{lo:g}, {hi:g}] within [0, 1], which is neither CT in "
        "HU nor 0-255 grey levels; give the original image, or set CTPreprocess.intensity to "
        "'hu' or 'grey' to say what it holds"
    )


def window_hu(
    hu: np.ndarray, level: float = LUNG_WINDOW_LEVEL, width: float = LUNG_WINDOW_WIDTH
) -> np.ndarray:
    """HU -> float32 in [-1, 1], linear inside the window and clipped outside it.

    ``level - width / 2`` maps to -1, ``level`` to 0 and ``level + width / 2`` to 1.
    """
    lo = np.float32(level - width / 2.0)
    unit = np.clip((np.asarray(hu, np.float32) - lo) / np.float32(width), 0.0, 1.0)
    return (unit * np.float32(2.0) - np.float32(1.0)).astype(np.float32)


def grey_to_unit(grey: np.ndarray) -> np.ndarray:
    """0-255 grey levels -> float32 in [-1, 1], as :func:`jaxfl.data.normalize_images`."""
    return normalize_images(np.clip(np.asarray(grey, np.float32), 0.0, GREY_MAX))


def resize_slices(stack: np.ndarray, size: tuple[int, int], *, order: int) -> np.ndarray:
    """Resample ``[N, h, w]`` to ``[N, H, W]``: ``order`` 1 linear (images), 0 nearest (labels).

    Pixel areas are aligned (half-pixel ``grid_mode``), so halving a size averages 2x2 blocks
    and nearest sampling only ever returns labels present in the input.
    """
    n, h, w = stack.shape
    if (h, w) == tuple(size):
        return stack
    if n == 0:
        return np.zeros((0, *size), stack.dtype)
    factors = (1.0, size[0] / h, size[1] / w)
    return scipy.ndimage.zoom(stack, factors, order=order, mode="nearest", grid_mode=True)


def remap_labels(mask: np.ndarray, label_map: Sequence[tuple[int, int]] | None) -> np.ndarray:
    """Apply ``(raw, class)`` pairs to an int mask; raw labels not listed become 0."""
    if label_map is None:
        return mask.astype(np.int32)
    top = max(int(mask.max(initial=0)), max((s for s, _ in label_map), default=0))
    lut = np.zeros(top + 1, np.int32)
    for src, dst in label_map:
        lut[src] = dst
    return lut[mask]


def _kept_slices(
    labels: np.ndarray, lung: np.ndarray | None, config: CTPreprocess, source: str
) -> np.ndarray:
    """Boolean ``[Z]``: the slices ``config`` keeps (all, or those with lung)."""
    if not config.lung_only:
        return np.ones(labels.shape[0], bool)
    if config.lung_labels:
        return np.isin(labels, config.lung_labels).any(axis=(1, 2))
    if lung is None:
        raise ConfigError(
            f"CTPreprocess.lung_only needs a lung mask, but {source} has none; give the case a "
            "lung mask (COVID-19-CT-Seg: unzip Lung_Mask.zip and use lung_masks=True; manifest: a "
            "'lung' column), or set lung_labels to the mask's lung labels"
        )
    if lung.shape != labels.shape:
        raise DataFileError(
            f"{source}: lung mask shape {lung.shape} differs from the mask's {labels.shape}"
        )
    return (np.asarray(lung) != 0).any(axis=(1, 2))


def preprocess_volume(
    image: np.ndarray,
    mask: np.ndarray,
    config: CTPreprocess | None = None,
    *,
    patient: str,
    site: str,
    lung: np.ndarray | None = None,
    slice_index: np.ndarray | None = None,
    intensity: str | None = None,
    source: str = "volume",
) -> SliceSet:
    """One case's slices ``[Z, H, W]`` (HU or 0-255) and mask -> a one-patient SliceSet.

    The shared path for real files and phantoms. ``lung [Z, H, W]`` is used by ``lung_only``;
    ``slice_index [Z]`` defaults to ``0..Z-1``; ``intensity`` overrides ``config.intensity``;
    ``source`` names the case in errors. Intensity is decided on the whole volume, before
    slices are dropped.
    """
    config = CTPreprocess() if config is None else config
    image = np.asarray(image, np.float32)
    if image.ndim != 3:
        raise DataFileError(f"{source}: image must be [Z, H, W], got shape {image.shape}")
    labels = _as_labels(mask, f"mask of {source}")
    if labels.shape != image.shape:
        raise DataFileError(
            f"{source}: mask shape {labels.shape} differs from image shape {image.shape}"
        )
    mode = intensity or config.intensity
    if mode == "auto":
        mode = detect_intensity(image, source)
    if slice_index is None:
        slice_index = np.arange(image.shape[0])
    keep = _kept_slices(labels, lung, config, source)
    kept_image, kept_labels = image[keep], remap_labels(labels[keep], config.label_map)
    if config.size is not None:
        kept_image = resize_slices(kept_image, config.size, order=1)
        kept_labels = resize_slices(kept_labels, config.size, order=0)
    if mode == "hu":
        unit = window_hu(kept_image, config.window_level, config.window_width)
    else:
        unit = grey_to_unit(kept_image)
    n = unit.shape[0]
    return SliceSet(
        image=unit[..., None],
        mask=kept_labels.astype(np.int32),
        patient=np.zeros(n, np.int32),
        site=np.zeros(n, np.int32),
        slice_index=np.asarray(slice_index, np.int32)[keep],
        patients=(patient,),
        sites=(site,),
    )


# --------------------------------------------------------------------------- slice sets


def take(slices: SliceSet, indices: Any) -> SliceSet:
    """The slices at ``indices`` (int array or boolean mask [N]); vocabularies are kept."""
    idx = np.asarray(indices)
    return slices._replace(
        image=slices.image[idx],
        mask=slices.mask[idx],
        patient=slices.patient[idx],
        site=slices.site[idx],
        slice_index=slices.slice_index[idx],
    )


def _vocabulary(names: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    """Union of name tuples in order of first appearance."""
    return tuple(dict.fromkeys(n for group in names for n in group))


def _check_patient_sites(patient: np.ndarray, site: np.ndarray, slices: SliceSet) -> None:
    """Raise DataFileError if a patient has slices in two sites (it would sit in two clients)."""
    pairs = np.unique(np.stack([patient, site], axis=1), axis=0)
    ids, counts = np.unique(pairs[:, 0], return_counts=True)
    if np.any(counts > 1):
        p = int(ids[np.argmax(counts > 1)])
        names = [slices.sites[s] for s in pairs[pairs[:, 0] == p, 1]]
        raise DataFileError(
            f"patient {slices.patients[p]!r} has slices in sites {names}; a patient must belong "
            "to one site (hospital), or its slices would be in two clients. Fix the site of "
            "that patient's cases (manifest 'site' column) or give the patients distinct names"
        )


def concat(parts: Sequence[SliceSet]) -> SliceSet:
    """Join slice sets (same H, W), merging their patient and site names.

    Raises DataFileError if a patient ends up in two sites.
    """
    if not parts:
        raise ValueError("concat needs at least one SliceSet")
    shapes = {p.image.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise ValueError(
            f"slice sets have different slice shapes {sorted(shapes)}; resample them to one size "
            "(CTPreprocess.size)"
        )
    patients = _vocabulary([p.patients for p in parts])
    sites = _vocabulary([p.sites for p in parts])
    p_index = {name: i for i, name in enumerate(patients)}
    s_index = {name: i for i, name in enumerate(sites)}
    patient = np.concatenate(
        [np.array([p_index[n] for n in p.patients], np.int32)[p.patient] for p in parts]
    )
    site = np.concatenate(
        [np.array([s_index[n] for n in p.sites], np.int32)[p.site] for p in parts]
    )
    joined = SliceSet(
        image=np.concatenate([p.image for p in parts]),
        mask=np.concatenate([p.mask for p in parts]),
        patient=patient.astype(np.int32),
        site=site.astype(np.int32),
        slice_index=np.concatenate([p.slice_index for p in parts]).astype(np.int32),
        patients=patients,
        sites=sites,
    )
    _check_patient_sites(joined.patient, joined.site, joined)
    return joined


# --------------------------------------------------------------------------- loading cases


def _suffix_in(path: Path, suffixes: Sequence[str]) -> bool:
    """Whether the file name ends with one of ``suffixes`` (case-insensitive)."""
    return path.name.lower().endswith(tuple(suffixes))


def _read_slice_image(path: Path) -> np.ndarray:
    """An 8-bit PNG/JPG slice as grey levels ``[1, H, W]`` float32 (colour is averaged)."""
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise DataFileError(
                    f"{path} is a {im.mode} (16-bit or float) image; slice images must be 8-bit "
                    "grey levels 0-255; store CT in HU as NIfTI instead"
                )
            grey = np.asarray(im if im.mode == "L" else im.convert("L"), np.float32)
    except OSError as err:
        raise DataFileError(f"could not read slice image {path} ({err})") from err
    return grey[None]


def _read_slice_mask(path: Path) -> np.ndarray:
    """A label PNG (greyscale or palette) as ``[1, H, W]`` int32."""
    if not _suffix_in(path, SLICE_MASK_SUFFIXES):
        raise DataFileError(
            f"slice mask {path} must be a PNG: lossy formats such as JPEG change labels at edges"
        )
    try:
        with Image.open(path) as im:
            if im.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DataFileError(
                    f"slice mask {path} is a {im.mode} image; save the class labels as a "
                    "greyscale or palette PNG (one label per pixel), not as colours"
                )
            labels = np.asarray(im)
    except OSError as err:
        raise DataFileError(f"could not read slice mask {path} ({err})") from err
    return _as_labels(labels, f"slice mask {path}")[None]


def _load_slice_case(case: CaseSpec, config: CTPreprocess) -> SliceSet:
    """One 2D slice file pair (plus optional lung PNG) -> a one-slice SliceSet."""
    image = _read_slice_image(case.image)
    mask = _read_slice_mask(case.mask)
    lung = None if case.lung is None else _read_slice_mask(case.lung)
    for other, path in ((mask, case.mask), (lung, case.lung)):
        if other is not None and other.shape != image.shape:
            raise DataFileError(
                f"slice mask {path} is {other.shape[1]}x{other.shape[2]} but its image "
                f"{case.image} is {image.shape[1]}x{image.shape[2]}; they must be the same size"
            )
    return preprocess_volume(
        image,
        mask,
        config,
        patient=case.patient,
        site=case.site,
        lung=lung,
        slice_index=np.array([NO_SLICE_INDEX]),
        intensity="grey",
        source=str(case.image),
    )


def load_case(case: CaseSpec, config: CTPreprocess | None = None) -> SliceSet:
    """Read and preprocess one case (NIfTI volume or 2D slice file) into a SliceSet."""
    config = CTPreprocess() if config is None else config
    if _suffix_in(case.image, SLICE_IMAGE_SUFFIXES):
        return _load_slice_case(case, config)
    if _nifti_stem(case.image) is None or _nifti_stem(case.mask) is None:
        raise DataFileError(
            f"case {case.image} / {case.mask}: give both as NIfTI (.nii, .nii.gz) or the image "
            f"as {'/'.join(SLICE_IMAGE_SUFFIXES)} and the mask as .png"
        )
    image = load_volume(case.image)
    mask = load_volume(case.mask)
    check_same_grid(image, mask, case.image, case.mask)
    lung = None
    if config.lung_only and not config.lung_labels and case.lung is not None:
        lung_volume = load_volume(case.lung)
        check_same_grid(image, lung_volume, case.image, case.lung)
        lung = lung_volume.data
    return preprocess_volume(
        image.data,
        mask.data,
        config,
        patient=case.patient,
        site=case.site,
        lung=lung,
        source=str(case.image),
    )


def _file_id(path: Path | None) -> list[Any] | None:
    """(absolute path, size, mtime in ns) of a file: what the cache key knows of it."""
    if path is None:
        return None
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def cache_key(cases: Sequence[CaseSpec], config: CTPreprocess) -> str:
    """Hex digest of the preprocessing config and every input file's path, size and mtime.

    Patient and site names are included (they are stored in the cache); ``split`` is not.
    """
    payload = {
        "version": CACHE_VERSION,
        "config": dataclasses.asdict(config),
        "cases": [
            [_file_id(c.image), _file_id(c.mask), _file_id(c.lung), c.patient, c.site]
            for c in cases
        ],
    }
    text = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_path(
    cache_dir: str | os.PathLike[str], cases: Sequence[CaseSpec], config: CTPreprocess
) -> Path:
    """Where :func:`load_cases` caches these cases under this config."""
    return Path(cache_dir).expanduser() / f"ct-slices-{cache_key(cases, config)}.npz"


def _write_cache(path: Path, slices: SliceSet) -> None:
    """Save ``slices`` uncompressed (fast to load), atomically via a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # uint8 labels when they fit: masks are as large as images and this is lossless.
    mask = slices.mask.astype(np.uint8) if slices.mask.max(initial=0) < 256 else slices.mask
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            image=slices.image,
            mask=mask,
            patient=slices.patient,
            site=slices.site,
            slice_index=slices.slice_index,
            patients=np.array(slices.patients, dtype=str),
            sites=np.array(slices.sites, dtype=str),
        )
    os.replace(tmp, path)


def _read_cache(path: Path) -> SliceSet | None:
    """The cached SliceSet, or None when absent or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return SliceSet(
                image=npz["image"],
                mask=npz["mask"].astype(np.int32),
                patient=npz["patient"],
                site=npz["site"],
                slice_index=npz["slice_index"],
                patients=tuple(str(s) for s in npz["patients"]),
                sites=tuple(str(s) for s in npz["sites"]),
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _preprocess_cases(cases: Sequence[CaseSpec], config: CTPreprocess) -> SliceSet:
    """Preprocess every case and join them; errors name the files at fault."""
    parts = [load_case(c, config) for c in cases]
    first = parts[0].image.shape[1:3]
    for part, case in zip(parts, cases, strict=True):
        if part.image.shape[1:3] != first:
            raise ConfigError(
                f"{case.image} has slices of {part.image.shape[1:3]} but {cases[0].image} has "
                f"{first}; set CTPreprocess.size=(H, W) to resample every case to one size"
            )
    slices = concat(parts)
    if slices.num_slices == 0:
        raise DataFileError(
            f"no slices kept from {len(cases)} case(s): lung_only found no lung in any of them; "
            "check the lung masks / CTPreprocess.lung_labels"
        )
    return slices


def load_cases(
    cases: Sequence[CaseSpec],
    config: CTPreprocess | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> SliceSet:
    """Preprocess ``cases`` (in order) into one SliceSet, cached in ``cache_dir`` if given.

    The cache file is named by :func:`cache_key`, so editing a file or changing a
    preprocessing option misses the cache and rebuilds it.
    """
    config = CTPreprocess() if config is None else config
    if not cases:
        raise DataFileError("no cases to load: the layout or manifest gave an empty list")
    path = None if cache_dir is None else cache_path(cache_dir, cases, config)
    cached = None if path is None else _read_cache(path)
    if cached is not None:
        return cached
    slices = _preprocess_cases(cases, config)
    if path is not None:
        _write_cache(path, slices)
    return slices


# --------------------------------------------------------------------------- layouts


def _covid_layout_message(root: Path, problem: str) -> str:
    """Download location and expected layout of COVID-19-CT-Seg, after ``problem``."""
    return (
        f"COVID-19-CT-Seg: {problem} under {root}\n"
        f"  official download: Zenodo record {COVID_CT_SEG_RECORD}, {COVID_CT_SEG_URL} "
        "(Ma et al. 2020, CC BY 4.0)\n"
        "  unzip COVID-19-CT-Seg_20cases.zip and Infection_Mask.zip (and Lung_Mask.zip for "
        f"lung_only) into {root}, giving for example:\n"
        f"    {root}/COVID-19-CT-Seg_20cases/coronacases_org_001.nii.gz\n"
        f"    {root}/COVID-19-CT-Seg_20cases/"
        "radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm.nii.gz\n"
        f"    {root}/Infection_Mask/coronacases_001.nii.gz\n"
        f"    {root}/Infection_Mask/radiopaedia_4_85506_1.nii.gz\n"
        f"    {root}/Lung_Mask/coronacases_001.nii.gz  (optional)\n"
        "  files are found by name anywhere under the root (.nii or .nii.gz, e.g. the Kaggle "
        "copy's ct_scans/ and infection_mask/); masks are told apart by a folder name containing "
        "'infection' or 'lung'"
    )


def _hidden(path: Path, root: Path) -> bool:
    """Whether a file is macOS or hidden junk (``._x``, ``__MACOSX/``, ``.git/``)."""
    return any(p.startswith((".", "__MACOSX")) for p in path.relative_to(root).parts)


def _covid_image_key(name: str) -> tuple[str, str] | None:
    """(case key, patient) of a COVID-19-CT-Seg image file name, or None."""
    if m := _CORONA_IMAGE.fullmatch(name):
        key = f"coronacases_{int(m[1]):03d}"
        return key, key
    if m := _RADIO_IMAGE.fullmatch(name):
        # The first number is the Radiopaedia case: 10_85902_1 and 10_85902_3 are two series
        # of one patient, as are 29_86490_1 and 29_86491_1.
        return f"radiopaedia_{m[1]}_{m[2]}_{m[3]}", f"radiopaedia_{m[1]}"
    return None


def _covid_mask_key(name: str) -> str | None:
    """Case key of a COVID-19-CT-Seg mask file name, or None."""
    if m := _CORONA_MASK.fullmatch(name):
        return f"coronacases_{int(m[1]):03d}"
    if m := _RADIO_MASK.fullmatch(name):
        return f"radiopaedia_{m[1]}_{m[2]}_{m[3]}"
    return None


def _mask_role(path: Path, root: Path) -> str | None:
    """``"infection"``, ``"lung"`` or None (combined lung+infection masks, or no hint)."""
    folders = " ".join(path.relative_to(root).parts[:-1]).lower()
    if "infection" in folders:
        return None if "lung" in folders else "infection"
    return "lung" if "lung" in folders else None


def _add_unique(found: dict[str, Path], key: str, path: Path, what: str) -> None:
    """Record ``path`` under ``key``; two files for one key is an error naming both."""
    if key in found:
        raise DataFileError(
            f"two {what} files for case {key}: {found[key]} and {path}; keep one of them"
        )
    found[key] = path


def _scan_covid(root: Path) -> tuple[dict[str, Path], dict[str, str], dict[str, dict[str, Path]]]:
    """Images by key, patient by key, and masks by role and key, found under ``root``."""
    images: dict[str, Path] = {}
    patients: dict[str, str] = {}
    masks: dict[str, dict[str, Path]] = {"infection": {}, "lung": {}}
    for path in sorted(root.rglob("*.nii*")):
        if _hidden(path, root) or not path.is_file():
            continue
        if image_key := _covid_image_key(path.name):
            _add_unique(images, image_key[0], path, "image")
            patients[image_key[0]] = image_key[1]
        elif (mask_key := _covid_mask_key(path.name)) and (role := _mask_role(path, root)):
            _add_unique(masks[role], mask_key, path, f"{role} mask")
    return images, patients, masks


def discover_covid19_ct_seg(
    root: str | os.PathLike[str], *, lung_masks: bool = False
) -> list[CaseSpec]:
    """COVID-19-CT-Seg (Zenodo 3757476) cases found under ``root``, sorted by case.

    Pairs image ``coronacases_org_001`` with mask ``coronacases_001`` and image
    ``radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm`` with mask ``radiopaedia_4_85506_1``.
    Site is the source (``"coronacases"`` or ``"radiopaedia"``); patient is the coronacases
    number or the Radiopaedia case number. ``lung_masks`` attaches the Lung_Mask files.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingCTDataError(_covid_layout_message(root, "the folder does not exist"))
    images, patients, masks = _scan_covid(root)
    infection = masks["infection"]
    if not images or not infection:
        raise MissingCTDataError(
            _covid_layout_message(
                root, f"found {len(images)} image and {len(infection)} infection-mask files"
            )
        )
    unpaired = sorted(set(images) ^ set(infection))
    if unpaired:
        raise DataFileError(
            f"COVID-19-CT-Seg under {root}: cases without both image and infection mask: "
            f"{unpaired}; re-extract the zips, or remove the stray files"
        )
    if lung_masks and set(masks["lung"]) != set(images):
        missing = sorted(set(images) - set(masks["lung"]))
        raise MissingCTDataError(
            _covid_layout_message(root, f"lung_masks=True but no lung mask for {missing}")
        )
    return [
        CaseSpec(
            image=images[key],
            mask=infection[key],
            patient=patients[key],
            site=key.split("_", 1)[0],
            lung=masks["lung"][key] if lung_masks else None,
        )
        for key in sorted(images)
    ]


def _msd_layout_message(root: Path, problem: str) -> str:
    """Download location and expected layout of an MSD / nnU-Net dataset, after ``problem``."""
    return (
        f"Medical Segmentation Decathlon / nnU-Net dataset: {problem} in {root}\n"
        f"  official download: {MSD_URL} (e.g. Task06_Lung)\n"
        "  expected layout:\n"
        f"    {root}/dataset.json\n"
        f"    {root}/imagesTr/NAME_0000.nii.gz  (nnU-Net; MSD's own NAME.nii.gz also works)\n"
        f"    {root}/labelsTr/NAME.nii.gz"
    )


def _msd_name(stem: str, labels: Mapping[str, Path]) -> tuple[str, str] | None:
    """(case name, channel) of an imagesTr stem, matched against the label names."""
    if stem in labels:
        return stem, "0000"
    m = _NNUNET_CHANNEL.fullmatch(stem)
    if m and m[1] in labels:
        return m[1], m[2]
    return None


def _nifti_files(folder: Path) -> dict[str, Path]:
    """NIfTI files directly in ``folder`` by stem, skipping hidden ones (MSD's ``._x``)."""
    return {
        stem: p
        for p in sorted(folder.iterdir())
        if not p.name.startswith(".") and (stem := _nifti_stem(p)) is not None
    }


def _msd_site(root: Path) -> str:
    """The dataset's ``name`` from ``dataset.json``, else the folder name."""
    meta = root / "dataset.json"
    if not meta.is_file():
        return root.name
    try:
        name = json.loads(meta.read_text()).get("name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise DataFileError(f"{meta} is not a valid JSON object ({err})") from err
    return str(name) if name else root.name


def discover_msd(root: str | os.PathLike[str], *, site: str | None = None) -> list[CaseSpec]:
    """MSD / nnU-Net training cases (``imagesTr`` + ``labelsTr``) in ``root``, sorted by name.

    Patient = case name; site = ``site``, else ``dataset.json``'s ``name``, else the folder
    name. Only single-channel (``_0000``) images are taken, as CT has one channel.
    """
    root = Path(root).expanduser()
    image_dir, label_dir = root / "imagesTr", root / "labelsTr"
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise MissingCTDataError(_msd_layout_message(root, "no imagesTr/ and labelsTr/ folders"))
    labels = _nifti_files(label_dir)
    images: dict[str, Path] = {}
    unpaired: list[str] = []
    for stem, path in _nifti_files(image_dir).items():
        named = _msd_name(stem, labels)
        if named is None:
            unpaired.append(path.name)
        elif named[1] != "0000":
            raise DataFileError(
                f"{path} is channel {named[1]} of case {named[0]}; jaxfl's CT path takes "
                "single-channel CT (only NAME_0000 files)"
            )
        else:
            _add_unique(images, named[0], path, "image")
    unpaired += [f"labelsTr/{labels[n].name}" for n in sorted(set(labels) - set(images))]
    if not images:
        raise MissingCTDataError(_msd_layout_message(root, "no image/label pairs"))
    if unpaired:
        raise DataFileError(f"{root}: files without a partner in imagesTr/labelsTr: {unpaired}")
    site = site or _msd_site(root)
    return [CaseSpec(images[n], labels[n], patient=n, site=site) for n in sorted(images)]


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV's column names and rows, keys and values stripped (a BOM-marked file too)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [
            {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            for row in reader
        ]
    return columns, rows


def _manifest_rows(path: Path) -> list[dict[str, str]]:
    """The CSV's rows with stripped keys and values; checks the required columns."""
    columns, rows = read_csv_rows(path)
    missing = [c for c in MANIFEST_REQUIRED if c not in columns]
    if missing:
        raise DataFileError(
            f"manifest {path} lacks columns {missing} (has {columns}); it needs "
            f"{', '.join(MANIFEST_REQUIRED)} and optionally split, lung"
        )
    return rows


def read_manifest(path: str | os.PathLike[str]) -> list[CaseSpec]:
    """Cases from a CSV with columns ``image, mask, patient, site`` (+ optional ``split``,
    ``lung``); relative paths are relative to the CSV's folder. Rows may name NIfTI volumes or
    2D slice files (PNG/JPG image, PNG mask), one slice per row.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingCTDataError(
            f"manifest not found: {path}\n  write a CSV with header image,mask,patient,site"
            ",split (split and a lung column optional; paths relative to the CSV's folder)"
        )
    cases, absent = [], []
    for line, row in enumerate(_manifest_rows(path), start=2):
        empty = [c for c in MANIFEST_REQUIRED if not row.get(c)]
        if empty:
            raise DataFileError(f"manifest {path} line {line}: empty {empty}")
        files = {c: path.parent / row[c] for c in ("image", "mask", "lung") if row.get(c)}
        absent += [f"line {line}: {p}" for p in files.values() if not p.is_file()]
        cases.append(
            CaseSpec(
                image=files["image"],
                mask=files["mask"],
                patient=row["patient"],
                site=row["site"],
                split=row.get("split") or None,
                lung=files.get("lung"),
            )
        )
    if absent:
        raise MissingCTDataError(
            f"manifest {path} names {len(absent)} missing file(s), e.g. {absent[:5]}; paths are "
            "relative to the manifest's folder"
        )
    return cases


def totalseg_example_cases(data_dir: str | os.PathLike[str] | None = None) -> list[CaseSpec]:
    """The TotalSegmentator example CT + segmentation pair in ``data_dir`` as one case.

    ``data_dir`` defaults to ``$JAXFL_DATA_DIR`` (then ``~/.medmnist``).
    """
    root = resolve_data_dir(data_dir)
    image, seg = root / TOTALSEG_EXAMPLE_IMAGE, root / TOTALSEG_EXAMPLE_SEG
    if not image.is_file() or not seg.is_file():
        raise MissingCTDataError(
            f"TotalSegmentator example not found: need {image} and {seg}\n"
            f"  source: {TOTALSEG_URL} example_ct_sm.nii.gz and example_seg.nii.gz, saved "
            f"under the names above; or point data_dir / $JAXFL_DATA_DIR at their folder"
        )
    return [CaseSpec(image=image, mask=seg, patient="totalseg_example", site="totalseg")]


def load_totalseg_example(
    data_dir: str | os.PathLike[str] | None = None,
    config: CTPreprocess | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> SliceSet:
    """The TotalSegmentator example (122x101x30 at 3 mm, HU) as slices; default: liver -> 1."""
    config = CTPreprocess(label_map={TOTALSEG_LIVER: 1}) if config is None else config
    return load_cases(totalseg_example_cases(data_dir), config, cache_dir)


# --------------------------------------------------------------------------- sites and splits


def _split_counts(n: int, fractions: Sequence[float], what: str) -> list[int]:
    """Split ``n`` patients by ``fractions`` (largest remainder), one or more per positive one."""
    f = np.asarray(fractions, np.float64)
    if f.ndim != 1 or f.size == 0 or np.any(f < 0) or abs(f.sum() - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must be >= 0 and sum to 1, got {tuple(fractions)}")
    positive = int(np.count_nonzero(f))
    if n < positive:
        raise ConfigError(
            f"{what} has {n} patient(s) but fractions {tuple(fractions)} need at least "
            f"{positive} (splits are by whole patients); use fewer splits or more patients"
        )
    raw = f * n
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - int(counts.sum())]] += 1
    for i in np.flatnonzero((f > 0) & (counts == 0)):
        counts[int(np.argmax(counts))] -= 1
        counts[i] += 1
    return counts.tolist()


def _split_patients(
    patients: np.ndarray, fractions: Sequence[float], rng: np.random.Generator, what: str
) -> list[np.ndarray]:
    """Shuffle patient ids and cut them into groups sized by ``fractions``."""
    counts = _split_counts(len(patients), fractions, what)
    return np.split(rng.permutation(patients), np.cumsum(counts)[:-1])


def _indices_of(slices: SliceSet, groups: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Sorted slice indices of each group of patient ids."""
    return tuple(np.flatnonzero(np.isin(slices.patient, g)) for g in groups)


def patient_split(
    slices: SliceSet, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[np.ndarray, ...]:
    """Slice indices of each split (e.g. train, val, test), drawn by whole patients.

    Every patient with slices lands in exactly one split; counts per split are the
    largest-remainder rounding of ``fractions`` times the number of patients.
    """
    rng = np.random.default_rng([seed, _SPLIT_SALT])
    groups = _split_patients(np.unique(slices.patient), fractions, rng, "the data")
    return _indices_of(slices, groups)


def site_patient_split(
    slices: SliceSet, fractions: Sequence[float] = (0.8, 0.2), seed: int = 0
) -> tuple[np.ndarray, ...]:
    """Like :func:`patient_split` within each site, so every site (client) is in every split:
    ``(train, heldout) = site_patient_split(slices)`` gives per-client local splits."""
    per_site = []
    for s in np.unique(slices.site):
        rng = np.random.default_rng([seed, _SPLIT_SALT, int(s)])
        patients = np.unique(slices.patient[slices.site == s])
        per_site.append(_split_patients(patients, fractions, rng, f"site {slices.sites[s]!r}"))
    groups = [np.concatenate(g) for g in zip(*per_site, strict=True)]
    return _indices_of(slices, groups)


def site_indices(slices: SliceSet) -> list[np.ndarray]:
    """Slice indices per site, in ``slices.sites`` order: one array per client."""
    return [np.flatnonzero(slices.site == s) for s in range(len(slices.sites))]


def partition_by_patient(slices: SliceSet, num_sites: int, seed: int = 0) -> SliceSet:
    """Reassign sites: patients shuffled and dealt round-robin into ``site0..site{k-1}``."""
    patients = np.unique(slices.patient)
    if not 1 <= num_sites <= len(patients):
        raise ConfigError(
            f"num_sites must be between 1 and the number of patients ({len(patients)}), got "
            f"{num_sites}"
        )
    order = np.random.default_rng([seed, _SITE_SALT]).permutation(patients)
    site_of = np.zeros(len(slices.patients), np.int32)
    site_of[order] = np.arange(len(order)) % num_sites
    return slices._replace(
        site=site_of[slices.patient], sites=tuple(f"site{k}" for k in range(num_sites))
    )


def predefined_split(slices: SliceSet, cases: Sequence[CaseSpec]) -> dict[str, np.ndarray]:
    """Slice indices per manifest ``split`` name; patients whose cases have no split are left
    out. Raises DataFileError if one patient's cases name two splits."""
    split_of: dict[str, str] = {}
    for case in cases:
        if case.split is None:
            continue
        previous = split_of.setdefault(case.patient, case.split)
        if previous != case.split:
            raise DataFileError(
                f"patient {case.patient!r} is in splits {previous!r} and {case.split!r}; a "
                "patient's cases must share one split, or its slices leak between splits"
            )
    names = list(dict.fromkeys(split_of.values()))
    # Split number of each patient index (-1: no split), looked up per slice.
    code = np.array([names.index(split_of[p]) if p in split_of else -1 for p in slices.patients])
    return {name: np.flatnonzero(code[slices.patient] == i) for i, name in enumerate(names)}
