"""CT volumes for 3D classification: RAD-ChestCT and NIfTI folders -> ``[N, D, H, W, 1]``.

numpy (plus nibabel via :mod:`jaxfl.data.ct`, and scipy.ndimage) only; nothing here imports JAX.

Two file layouts turn into :class:`VolumeCase` rows:

- **RAD-ChestCT** (Draelos et al. 2021, Zenodo record 6406114; :func:`discover_radchest`): one
  ``<NoteAcc_DEID>.npz`` per scan (``trn00001.npz``, ``val00001.npz``, ``tst00001.npz``), each
  holding the array ``ct``: Hounsfield units, ``[slices, rows, cols]``, axial slices first; and
  the label tables ``img{train,valid,test}_Abnormality_and_Location_Labels.csv``: one row per
  scan (column ``NoteAcc_DEID``) and one 0/1 column per ``abnormality*location`` pair
  (``nodule*left_lung``). The label is "any abnormality" (any 1 in the row) or one named
  abnormality (any of its locations). Each table is a site, as PPPML-HMI's three clients are.
- **A label CSV over NIfTI volumes** (:func:`read_volume_csv`), what most users have: columns
  ``image`` (path, relative to the CSV) and ``label`` (int), optionally ``site`` and ``split``
  (``train``/``test``).

:func:`load_volumes` preprocesses the cases into one :class:`VolumeSet`: window the intensities
(HU clipped to ``hu_window``, or 0-255 grey levels) onto [-1, 1], then resample every volume
to ``shape`` (box-filtered before a linear zoom, so large reductions average rather than
alias), keeping the axis order and directions of the file. The result is cached as ``.npy``
files that later runs memory-map, so the host holds only what the clients touch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.ndimage

from jaxfl.data.ct import (
    INTENSITY_MODES,
    MissingCTDataError,
    detect_intensity,
    grey_to_unit,
    load_volume,
    read_csv_rows,
    window_hu,
)
from jaxfl.data.lazy import LazyRows
from jaxfl.errors import ConfigError, DataFileError
from jaxfl.types import Dataset, Split

RADCHEST_RECORD = "6406114"
RADCHEST_URL = f"https://zenodo.org/records/{RADCHEST_RECORD}"
RADCHEST_TABLES = {
    "train": "imgtrain_Abnormality_and_Location_Labels.csv",
    "valid": "imgvalid_Abnormality_and_Location_Labels.csv",
    "test": "imgtest_Abnormality_and_Location_Labels.csv",
}
RADCHEST_ID = "NoteAcc_DEID"
RADCHEST_ARRAY = "ct"
# Folders under the root searched for the tables and the scans (the release's and common copies').
_SUBDIRS = ("", "tables", "labels", "images", "npz", "volumes")
CACHE_VERSION = 1
DEFAULT_SHAPE = (70, 70, 70)
# Air (-1000 HU) to soft tissue (~ +200 HU); clipping first also bounds the resampled values.
DEFAULT_HU_WINDOW = (-1000.0, 200.0)


class VolumeCase(NamedTuple):
    """One scan: its file, label, site and (optional) predefined split."""

    path: Path
    label: int
    site: str
    split: str | None = None


@dataclasses.dataclass(frozen=True)
class VolumePreprocess:
    """How files become model input. Part of the cache key.

    ``shape (D, H, W)`` to resample to; ``hu_window (lo, hi)`` in HU mapped onto [-1, 1];
    ``intensity``: ``"auto"`` (detect HU vs 0-255 grey levels), ``"hu"`` or ``"grey"``.
    """

    shape: tuple[int, int, int] = DEFAULT_SHAPE
    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW
    intensity: str = "auto"

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(int(s) < 1 for s in self.shape):
            raise ConfigError(f"volume shape={self.shape}; give (D, H, W), e.g. (70, 70, 70)")
        lo, hi = self.hu_window
        if not lo < hi:
            raise ConfigError(f"hu_window={self.hu_window}; give (low, high) HU with low < high")
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(
                f"volume intensity={self.intensity!r}; choose one of {INTENSITY_MODES}"
            )


class VolumeSet(NamedTuple):
    """Preprocessed volumes: ``image [N, D, H, W, 1]`` float32 in [-1, 1] (possibly a read-only
    memory map), ``label [N]`` int32, ``site [N]`` int32 into ``sites``, ``split [N]`` str
    (``""`` where none was given), ``ids`` one name per volume."""

    image: np.ndarray
    label: np.ndarray
    site: np.ndarray
    split: np.ndarray
    sites: tuple[str, ...]
    ids: tuple[str, ...]


# --------------------------------------------------------------------------- preprocessing


def box_resample(volume: np.ndarray, shape: Sequence[int], *, order: int = 1) -> np.ndarray:
    """Resample ``[D, H, W]`` to ``shape``, axis order and directions unchanged.

    Axes shrunk by a factor f >= 2 are box-filtered over about f voxels first, so the linear
    zoom averages the voxels it drops instead of aliasing them; linear interpolation of
    averages never leaves the input's value range.
    """
    volume = np.asarray(volume, np.float32)
    shape = tuple(int(s) for s in shape)
    if volume.shape == shape:
        return volume
    box = tuple(max(1, int(n // s)) for n, s in zip(volume.shape, shape, strict=True))
    if any(b > 1 for b in box):
        volume = scipy.ndimage.uniform_filter(volume, size=box, mode="nearest")
    factors = tuple(s / n for s, n in zip(shape, volume.shape, strict=True))
    return scipy.ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True)


def to_unit(volume: np.ndarray, config: VolumePreprocess, source: str) -> np.ndarray:
    """Intensities onto [-1, 1]: HU through ``hu_window`` (clipped), or 0-255 grey levels."""
    mode = config.intensity
    if mode == "auto":
        mode = detect_intensity(volume, source)
    if mode == "grey":
        return grey_to_unit(volume)
    lo, hi = config.hu_window
    return window_hu(volume, level=(lo + hi) / 2.0, width=hi - lo)


def preprocess(volume: np.ndarray, config: VolumePreprocess, source: str = "volume") -> np.ndarray:
    """One raw ``[D, H, W]`` volume -> ``[*config.shape, 1]`` float32 in [-1, 1]."""
    volume = np.asarray(volume)
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise DataFileError(
            f"{source} has shape {volume.shape}; a CT volume is 3D [slices, rows, cols]"
        )
    return box_resample(to_unit(volume, config, source), config.shape)[..., None]


# --------------------------------------------------------------------------- reading files


def read_npz_volume(path: Path) -> np.ndarray:
    """The ``ct`` array of a RAD-ChestCT ``.npz`` (or the only array of another ``.npz``)."""
    if not path.is_file():
        raise MissingCTDataError(f"volume file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            key = RADCHEST_ARRAY if RADCHEST_ARRAY in keys else keys[0] if len(keys) == 1 else None
            if key is None:
                raise DataFileError(
                    f"{path} holds arrays {keys}; jaxfl reads the array {RADCHEST_ARRAY!r} "
                    "(RAD-ChestCT's) or a file's only array"
                )
            return npz[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataFileError(f"could not read {path} as .npz ({err}); is it truncated?") from err


def read_case(case: VolumeCase) -> np.ndarray:
    """The raw ``[D, H, W]`` volume of ``case`` (``.npz``, ``.npy`` or NIfTI)."""
    name = case.path.name.lower()
    if name.endswith(".npz"):
        return read_npz_volume(case.path)
    if name.endswith(".npy"):
        if not case.path.is_file():
            raise MissingCTDataError(f"volume file not found: {case.path}")
        return np.load(case.path, allow_pickle=False)
    return load_volume(case.path).data  # NIfTI: canonical axial slices [Z, H, W]


def _radchest_message(root: Path, problem: str) -> str:
    tables = ", ".join(RADCHEST_TABLES.values())
    return (
        f"RAD-ChestCT: {problem} under {root}.\n"
        f"  official download: {RADCHEST_URL} (record {RADCHEST_RECORD}; the full set needs the "
        "data-use agreement described there)\n"
        f"  expected layout: the label tables {tables} and one <NoteAcc_DEID>.npz per scan "
        f"(array '{RADCHEST_ARRAY}', HU, [slices, rows, cols]), in the folder itself or in its "
        f"sub-folders {[d for d in _SUBDIRS if d]}.\n"
        "  point jaxfl at the folder with config.data.data_dir or $JAXFL_DATA_DIR."
    )


def _find(root: Path, name: str) -> Path | None:
    for sub in _SUBDIRS:
        path = root / sub / name
        if path.is_file():
            return path
    return None


def _row_label(row: dict[str, str], columns: Sequence[str], path: Path) -> int:
    try:
        return int(any(float(row[c] or 0) > 0 for c in columns))
    except ValueError as err:
        raise DataFileError(f"{path}: a label column holds a non-number ({err})") from err


def discover_radchest(root: str | os.PathLike[str], abnormality: str = "") -> list[VolumeCase]:
    """RAD-ChestCT scans with a binary label: any abnormality, or ``abnormality`` (any location).

    Sites are the label tables present (``train``, ``valid``, ``test``): PPPML-HMI's three
    simulated hospitals. Scans listed in a table but missing on disk are an error.
    """
    root = Path(root).expanduser()
    tables = {site: _find(root, name) for site, name in RADCHEST_TABLES.items()}
    tables = {site: path for site, path in tables.items() if path is not None}
    if not tables:
        raise MissingCTDataError(_radchest_message(root, "no label table found"))
    cases: list[VolumeCase] = []
    for site, path in tables.items():
        columns, rows = read_csv_rows(path)
        if RADCHEST_ID not in columns:
            raise DataFileError(f"{path} has no {RADCHEST_ID!r} column (columns: {columns[:5]}...)")
        findings = [c for c in columns if "*" in c]
        if abnormality:
            chosen = [c for c in findings if c.split("*", 1)[0] == abnormality]
            if not chosen:
                names = sorted({c.split("*", 1)[0] for c in findings})
                raise ConfigError(
                    f"config.data.volume.abnormality={abnormality!r} is not a RAD-ChestCT "
                    f"finding in {path.name}; choose one of {names} (or '' for any)"
                )
        else:
            chosen = findings
        if not chosen:
            raise DataFileError(f"{path} has no 'abnormality*location' label columns")
        for row in rows:
            scan = row[RADCHEST_ID]
            volume = _find(root, f"{scan}.npz")
            if volume is None:
                raise MissingCTDataError(
                    _radchest_message(root, f"{scan}.npz (listed in {path.name}) not found")
                )
            cases.append(VolumeCase(volume, _row_label(row, chosen, path), site))
    return cases


def read_volume_csv(path: str | os.PathLike[str]) -> list[VolumeCase]:
    """Cases from a CSV with columns ``image``, ``label`` (optional ``site``, ``split``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingCTDataError(
            f"volume label CSV not found: {path}; write one with columns image (NIfTI/.npy/.npz "
            "path, relative to the CSV), label (int), optional site and split (train/test)"
        )
    columns, rows = read_csv_rows(path)
    missing = [c for c in ("image", "label") if c not in columns]
    if missing:
        raise DataFileError(f"{path} lacks the column(s) {missing}; it has {columns}")
    cases = []
    for i, row in enumerate(rows):
        try:
            label = int(row["label"])
        except ValueError:
            raise DataFileError(
                f"{path} row {i + 2}: label {row['label']!r} is not an integer class"
            ) from None
        if label < 0:
            raise DataFileError(f"{path} row {i + 2}: label {label} is negative")
        image = Path(row["image"])
        image = image if image.is_absolute() else path.parent / image
        split = row.get("split") or None
        if split not in (None, "train", "test"):
            raise DataFileError(f"{path} row {i + 2}: split {split!r}; use train, test or empty")
        cases.append(VolumeCase(image, label, row.get("site") or "site0", split))
    if not cases:
        raise DataFileError(f"{path} lists no volumes")
    return cases


# --------------------------------------------------------------------------- loading + cache


def cache_key(cases: Sequence[VolumeCase], config: VolumePreprocess) -> str:
    """Digest of the preprocessing and every file's path, size and mtime, label and site."""
    files = []
    for c in cases:
        stat = c.path.stat()
        files.append([str(c.path.resolve()), stat.st_size, stat.st_mtime_ns, c.label, c.site])
    payload = {"version": CACHE_VERSION, "config": dataclasses.asdict(config), "cases": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _assemble(cases: Sequence[VolumeCase], image: np.ndarray) -> VolumeSet:
    sites = tuple(dict.fromkeys(c.site for c in cases))
    return VolumeSet(
        image=image,
        label=np.array([c.label for c in cases], np.int32),
        site=np.array([sites.index(c.site) for c in cases], np.int32),
        split=np.array([c.split or "" for c in cases], dtype=str),
        sites=sites,
        ids=tuple(c.path.name for c in cases),
    )


def _preprocess_into(cases: Sequence[VolumeCase], config: VolumePreprocess, out: np.ndarray):
    for i, case in enumerate(cases):
        out[i] = preprocess(read_case(case), config, str(case.path))


def load_volumes(
    cases: Sequence[VolumeCase],
    config: VolumePreprocess | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> VolumeSet:
    """Preprocess ``cases`` into a VolumeSet; with ``cache_dir``, through a memory-mapped cache.

    The cache is a folder ``volumes-<key>/image.npy`` keyed by :func:`cache_key`; volumes are
    written one at a time into the memory map (the host never holds them all), and the folder
    appears only once complete.
    """
    config = VolumePreprocess() if config is None else config
    if not cases:
        raise DataFileError("no volumes to load: the layout or CSV gave an empty list")
    shape = (len(cases), *config.shape, 1)
    if cache_dir is None:
        image = np.zeros(shape, np.float32)
        _preprocess_into(cases, config, image)
        return _assemble(cases, image)
    folder = Path(cache_dir).expanduser() / f"volumes-{cache_key(cases, config)}"
    target = folder / "image.npy"
    if not target.is_file():
        tmp = folder.with_name(folder.name + f".{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        image = np.lib.format.open_memmap(tmp / "image.npy", "w+", np.float32, shape)
        _preprocess_into(cases, config, image)
        image.flush()
        del image
        if folder.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    image = np.load(target, mmap_mode="r")
    if image.shape != shape:
        raise DataFileError(f"{target} holds {image.shape}, expected {shape}; delete the folder")
    return _assemble(cases, image)


# --------------------------------------------------------------------------- splits

_SPLIT_SALT = 0x7E57


def global_test_indices(volumes: VolumeSet, test_fraction: float, seed: int) -> np.ndarray:
    """The global test volumes: those marked ``test``, else ``test_fraction`` of each site's.

    Per-site draws keep every site represented in the test split, as in the segmentation path.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(
            f"config.data.volume.test_fraction={test_fraction}; give a value in [0, 1)"
        )
    marked = np.flatnonzero(volumes.split == "test")
    if marked.size or (volumes.split == "train").any():
        return marked
    rng = np.random.default_rng([int(seed), _SPLIT_SALT])
    picked = []
    for s in range(len(volumes.sites)):
        idx = rng.permutation(np.flatnonzero(volumes.site == s))
        picked.append(idx[: int(np.floor(test_fraction * idx.size + 1e-9))])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def volume_dataset(
    volumes: VolumeSet, test_fraction: float, seed: int, num_classes: int = 0, name: str = ""
) -> tuple[Dataset, np.ndarray]:
    """A classification Dataset (train = every non-test volume) and each train volume's site.

    ``num_classes`` 0 means ``max(2, largest label + 1)``. Train images are
    :class:`~jaxfl.data.lazy.LazyRows` of ``volumes.image`` (read when used: a memory-mapped
    cache is not copied into RAM); test images are gathered.
    """
    test = global_test_indices(volumes, test_fraction, seed)
    train = np.setdiff1d(np.arange(len(volumes.label)), test)
    classes = num_classes or max(2, int(volumes.label.max(initial=0)) + 1)
    if volumes.label.max(initial=0) >= classes:
        raise ConfigError(
            f"volume labels go up to {int(volumes.label.max())} but config.task.num_classes="
            f"{classes}; set it to at least {int(volumes.label.max()) + 1} (or 0 to infer it)"
        )

    def split(idx: np.ndarray, lazy: bool) -> Split:
        images = LazyRows(volumes.image, idx) if lazy else volumes.image[idx]
        return Split(images=images, labels=volumes.label[idx])

    empty = Split(np.zeros((0, *volumes.image.shape[1:]), np.float32), np.zeros(0, np.int32))
    dataset = Dataset(
        name=name, train=split(train, True), val=empty, test=split(test, False), num_classes=classes
    )
    return dataset, volumes.site[train]
