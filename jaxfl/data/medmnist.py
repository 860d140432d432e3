"""Load official MedMNIST v2 ``.npz`` files into :class:`jaxfl.types.Dataset`.

The official files hold ``{train,val,test}_images`` (uint8; 2D gray ``[N, H, W]``, 2D RGB
``[N, H, W, 3]``, 3D ``[N, D, H, W]``) and ``{train,val,test}_labels`` (``[N, 1]``). Images are
normalized like the BloodMNIST paper (torchvision ``ToTensor`` then ``Normalize(0.5, 0.5)``) and
always get a trailing channel axis.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxfl.errors import DataFileError, UserError
from jaxfl.types import Dataset, Split

DATA_DIR_ENV = "JAXFL_DATA_DIR"
# The `medmnist` package's default root (medmnist/info.py: ~/.medmnist).
DEFAULT_DATA_DIR = "~/.medmnist"
ZENODO_RECORD = "10519652"
SPLITS = ("train", "val", "test")
REQUIRED_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))


class MissingDataError(UserError, FileNotFoundError):
    """A MedMNIST file is not where jaxfl looked; the message says how to get it."""


class MedMNISTInfo(NamedTuple):
    """Static facts about one MedMNIST v2 flag (from ``medmnist.INFO``)."""

    python_class: str
    num_classes: int
    channels: int
    is_3d: bool
    multi_label: bool = False


# num_classes / n_channels / python_class as in medmnist.INFO (v2.x and v3.0).
MEDMNIST_INFO: dict[str, MedMNISTInfo] = {
    "pathmnist": MedMNISTInfo("PathMNIST", 9, 3, False),
    "chestmnist": MedMNISTInfo("ChestMNIST", 14, 1, False, multi_label=True),
    "dermamnist": MedMNISTInfo("DermaMNIST", 7, 3, False),
    "octmnist": MedMNISTInfo("OCTMNIST", 4, 1, False),
    "pneumoniamnist": MedMNISTInfo("PneumoniaMNIST", 2, 1, False),
    "retinamnist": MedMNISTInfo("RetinaMNIST", 5, 3, False),
    "breastmnist": MedMNISTInfo("BreastMNIST", 2, 1, False),
    "bloodmnist": MedMNISTInfo("BloodMNIST", 8, 3, False),
    "tissuemnist": MedMNISTInfo("TissueMNIST", 8, 1, False),
    "organamnist": MedMNISTInfo("OrganAMNIST", 11, 1, False),
    "organcmnist": MedMNISTInfo("OrganCMNIST", 11, 1, False),
    "organsmnist": MedMNISTInfo("OrganSMNIST", 11, 1, False),
    "organmnist3d": MedMNISTInfo("OrganMNIST3D", 11, 1, True),
    "nodulemnist3d": MedMNISTInfo("NoduleMNIST3D", 2, 1, True),
    "adrenalmnist3d": MedMNISTInfo("AdrenalMNIST3D", 2, 1, True),
    "fracturemnist3d": MedMNISTInfo("FractureMNIST3D", 3, 1, True),
    "vesselmnist3d": MedMNISTInfo("VesselMNIST3D", 2, 1, True),
    "synapsemnist3d": MedMNISTInfo("SynapseMNIST3D", 2, 1, True),
}


def _check_name(name: str) -> str:
    """Return ``name`` lower-cased after checking it is a non-empty string."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            f"name must be a non-empty dataset flag such as 'bloodmnist', got {name!r}"
        )
    return name.strip().lower()


def _check_size(size: int) -> int:
    """Return ``size`` after checking it is a positive int (official: 28, 64, 128, 224)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int such as 28, 64, 128 or 224, got {size!r}")
    return int(size)


def medmnist_filename(name: str, size: int = 28) -> str:
    """Official file name: ``'bloodmnist.npz'`` at size 28, else ``'bloodmnist_{size}.npz'``."""
    flag, size = _check_name(name), _check_size(size)
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def medmnist_url(name: str, size: int = 28) -> str:
    """Official Zenodo download URL of one MedMNIST file."""
    filename = medmnist_filename(name, size)
    return f"https://zenodo.org/records/{ZENODO_RECORD}/files/{filename}?download=1"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Data directory: explicit ``data_dir``, else ``$JAXFL_DATA_DIR``, else ``~/.medmnist``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "")
    if env.strip():
        return Path(env).expanduser()
    return Path(DEFAULT_DATA_DIR).expanduser()


def missing_data_message(path: Path, name: str, size: int = 28) -> str:
    """Human instructions for fetching a missing MedMNIST file to ``path``."""
    flag = _check_name(name)
    filename = medmnist_filename(flag, size)
    info = MEDMNIST_INFO.get(flag)
    cls = info.python_class if info else "<DatasetClass>"
    root = path.parent
    return (
        f"MedMNIST file not found: {path}\n"
        f"  expected file name: {filename} in directory {root}\n"
        f"  official download:  {medmnist_url(flag, size)}\n"
        f"  put the file in that directory, or point jaxfl at the directory holding it with the "
        f"config field `data_dir` or the environment variable {DATA_DIR_ENV}=/path/to/dir.\n"
        f"  With network access you can also run (medmnist needs the directory to exist):\n"
        f"    mkdir -p '{root}' && pip install -e \".[medmnist]\" && \\\n"
        f"    python -c \"import medmnist; medmnist.{cls}(split='train', download=True, "
        f"root='{root}', size={size})\""
    )


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, ...]`` -> float32 in [-1, 1]: ``ToTensor`` (x/255) then ``Normalize(.5, .5)``."""
    # Same two float32 steps as torchvision, so values match the paper's pipeline bit for bit.
    x = images.astype(np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)


def _reject_multi_label(flag: str) -> None:
    """Raise NotImplementedError for multi-label flags (chestmnist)."""
    info = MEDMNIST_INFO.get(flag)
    if info is not None and info.multi_label:
        raise NotImplementedError(
            f"{flag} is multi-label ({info.num_classes} binary labels per image); jaxfl only "
            "supports single-label classification. Use another MedMNIST flag."
        )


def _is_3d(flag: str) -> bool:
    """Whether a flag names a volumetric dataset (table first, then the '3d' suffix)."""
    info = MEDMNIST_INFO.get(flag)
    return info.is_3d if info is not None else flag.endswith("3d")


def _add_channel_axis(images: np.ndarray, is_3d: bool, key: str) -> np.ndarray:
    """Raw ``[N, H, W]`` / ``[N, H, W, 3]`` / ``[N, D, H, W]`` -> channel-last with a C axis."""
    if is_3d:
        if images.ndim != 4:
            raise ValueError(
                f"{key}: a 3D dataset needs images [N, D, H, W], got shape {images.shape}; "
                "is it a 2D dataset's file under a 3D name (config.data.name)?"
            )
        return images[..., None]
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4 and images.shape[-1] == 3:
        return images
    raise ValueError(
        f"{key}: 2D images must be gray [N, H, W] or RGB [N, H, W, 3], got shape {images.shape}; "
        "is it a 3D dataset's file under a 2D name (config.data.name)?"
    )


def _labels_to_int32(labels: np.ndarray, n: int, key: str) -> np.ndarray:
    """Official ``[N, 1]`` (or ``[N]``) integer labels -> int32 ``[N]``."""
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise NotImplementedError(
            f"{key} has shape {labels.shape}: multi-label data (e.g. chestmnist) is not supported"
        )
    if labels.ndim not in (1, 2) or labels.shape[0] != n:
        raise ValueError(f"{key} must have shape [{n}, 1] or [{n}], got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{key} must hold integer class ids, got dtype {labels.dtype}")
    flat = labels.reshape(n)
    if n and flat.min() < 0:
        raise ValueError(f"{key} holds negative class ids (min {flat.min()}); expected 0..C-1")
    return flat.astype(np.int32)


def arrays_to_dataset(
    arrays: Mapping[str, np.ndarray],
    name: str,
    *,
    is_3d: bool | None = None,
    num_classes: int | None = None,
    source: str = "arrays",
) -> Dataset:
    """Raw MedMNIST dict (uint8 images, ``[N, 1]`` labels) -> normalized channel-last Dataset.

    ``is_3d`` defaults to the flag table / a name ending in '3d'; ``num_classes`` defaults to
    the table, else max label + 1. ``source`` names the file in error messages.
    """
    flag = _check_name(name)
    info = MEDMNIST_INFO.get(flag)
    _reject_multi_label(flag)
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise ValueError(
            f"{source} lacks keys {missing}; an official MedMNIST file has keys "
            f"{list(REQUIRED_KEYS)}; re-download it or fix the program that wrote it."
        )
    volumetric = _is_3d(flag) if is_3d is None else bool(is_3d)

    splits: dict[str, Split] = {}
    spatial: tuple[int, ...] | None = None
    for split in SPLITS:
        images = np.asarray(arrays[f"{split}_images"])
        if images.dtype != np.uint8:
            raise ValueError(
                f"{source}: {split}_images must be uint8 (0..255) like the official files, "
                f"got {images.dtype}"
            )
        images = _add_channel_axis(images, volumetric, f"{source}: {split}_images")
        if spatial is None:
            spatial = images.shape[1:]
            if info is not None and spatial[-1] != info.channels:
                raise ValueError(
                    f"{source}: {flag} should have {info.channels} channel(s), got images with "
                    f"per-example shape {spatial}; is the file for another dataset?"
                )
        elif images.shape[1:] != spatial:
            raise ValueError(
                f"{source}: {split}_images has per-example shape {images.shape[1:]} but "
                f"train_images has {spatial}; all splits must share one resolution"
            )
        labels = _labels_to_int32(
            np.asarray(arrays[f"{split}_labels"]), images.shape[0], f"{source}: {split}_labels"
        )
        splits[split] = Split(images=normalize_images(images), labels=labels)

    max_label = max((int(s.labels.max()) for s in splits.values() if s.labels.size), default=-1)
    if num_classes is None:
        num_classes = info.num_classes if info is not None else max_label + 1
    if max_label >= num_classes:
        raise ValueError(
            f"{source}: labels go up to {max_label} but num_classes is {num_classes}; "
            "pass a larger num_classes or check the file"
        )
    return Dataset(
        name=flag,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=int(num_classes),
    )


def medmnist_path(
    name: str, data_dir: str | os.PathLike[str] | None = None, size: int = 28
) -> Path:
    """Full path where :func:`load_medmnist` looks for a file."""
    return resolve_data_dir(data_dir) / medmnist_filename(name, size)


def load_medmnist(
    name: str, data_dir: str | os.PathLike[str] | None = None, size: int = 28
) -> Dataset:
    """Load an official MedMNIST ``.npz`` as a Dataset (images ``[N, *spatial, C]`` in [-1, 1])."""
    flag = _check_name(name)
    # Fail before touching the disk: no file would make a multi-label flag loadable.
    _reject_multi_label(flag)
    path = medmnist_path(flag, data_dir, size)
    if not path.is_file():
        raise MissingDataError(missing_data_message(path, flag, size))
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise DataFileError(
            f"could not read {path} as a MedMNIST .npz ({err}); the file may be truncated or "
            f"not an npz. Delete it and re-download from {medmnist_url(flag, size)}"
        ) from err
    try:
        return arrays_to_dataset(arrays, flag, source=str(path))
    except ValueError as err:
        raise DataFileError(f"{err} (official file: {medmnist_url(flag, size)})") from err
