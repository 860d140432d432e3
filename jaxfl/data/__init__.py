"""Data: MedMNIST loading, synthetic MedMNIST-format data, partitioners, federated stacking."""

from __future__ import annotations

from jaxfl.data.federated import build_federated, split_heldout, stack_clients
from jaxfl.data.heterogeneity import (
    HELDOUT_STREAM,
    TRAIN_STREAM,
    AcquisitionShift,
    apply_shift,
    apply_to_clients,
    sample_shifts,
    scanner_presets,
    shifts_from_config,
)
from jaxfl.data.medmnist import (
    DATA_DIR_ENV,
    MEDMNIST_INFO,
    MedMNISTInfo,
    MissingDataError,
    arrays_to_dataset,
    load_medmnist,
    medmnist_filename,
    medmnist_path,
    medmnist_url,
    normalize_images,
    resolve_data_dir,
)
from jaxfl.data.partition import (
    PARTITIONERS,
    bloodmnist_paper,
    dirichlet,
    iid,
    partition,
    pathological,
    quantity_skew,
)
from jaxfl.data.synthetic import make_synthetic_arrays, synthetic_dataset, write_npz

__all__ = [
    "HELDOUT_STREAM",
    "TRAIN_STREAM",
    "AcquisitionShift",
    "apply_shift",
    "apply_to_clients",
    "sample_shifts",
    "scanner_presets",
    "shifts_from_config",
    "DATA_DIR_ENV",
    "MEDMNIST_INFO",
    "PARTITIONERS",
    "MedMNISTInfo",
    "MissingDataError",
    "arrays_to_dataset",
    "bloodmnist_paper",
    "build_federated",
    "dirichlet",
    "iid",
    "load_medmnist",
    "make_synthetic_arrays",
    "medmnist_filename",
    "medmnist_path",
    "medmnist_url",
    "normalize_images",
    "partition",
    "pathological",
    "quantity_skew",
    "resolve_data_dir",
    "split_heldout",
    "stack_clients",
    "synthetic_dataset",
    "write_npz",
]
