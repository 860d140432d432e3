"""CT slices -> federated segmentation data: hospitals (sites) are clients, splits are by patient.

A :class:`jaxfl.data.ct.SliceSet` becomes :class:`jaxfl.types.FederatedData` whose examples are
``{"image": [N, H, W, 1], "mask": [N, H, W] int32, "case": [N] int32}`` (``case`` = patient
index, so Dice can be scored per volume). Within every site, whole patients are drawn into the
client's training, held-out and the global test split, so no patient's slices appear in two
splits or two clients.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxfl.data.ct import SliceSet, predefined_split, site_indices, site_patient_split
from jaxfl.data.federated import stack_clients
from jaxfl.errors import ConfigError
from jaxfl.tasks.seg_ops import IGNORE_LABEL
from jaxfl.types import Batch, FederatedData

# Manifest split names and the FederatedData split each one fills.
SPLIT_NAMES = {"train": "train", "val": "heldout", "heldout": "heldout", "test": "test"}
# The value padding pixels get: -1 is air after the lung window (and the low end of [-1, 1]).
PAD_VALUE = -1.0


def pad_to_multiple(slices: SliceSet, multiple: int) -> SliceSet:
    """Pad ``H`` and ``W`` up to a multiple of ``multiple`` (e.g. ``2**depth`` of a U-Net).

    Padding goes equally on both sides (the extra pixel at the end); images are padded with
    :data:`PAD_VALUE` and masks with :data:`IGNORE_LABEL`, so padded pixels count in no loss
    or metric.
    """
    if multiple < 1:
        raise ConfigError(f"pad multiple must be >= 1, got {multiple}")
    h, w = slices.image.shape[1:3]
    extra = [(-n) % multiple for n in (h, w)]
    if not any(extra):
        return slices
    widths = [(e // 2, e - e // 2) for e in extra]
    image = np.pad(slices.image, [(0, 0), *widths, (0, 0)], constant_values=PAD_VALUE)
    mask = np.pad(slices.mask, [(0, 0), *widths], constant_values=IGNORE_LABEL)
    return slices._replace(image=image, mask=mask)


def slice_examples(slices: SliceSet, indices: np.ndarray | None = None) -> Batch:
    """The engine's feature dict of ``slices`` (all, or those at ``indices``)."""
    idx = slice(None) if indices is None else np.asarray(indices)
    return {
        "image": np.asarray(slices.image[idx], np.float32),
        "mask": np.asarray(slices.mask[idx], np.int32),
        "case": np.asarray(slices.patient[idx], np.int32),
    }


def patient_splits(
    slices: SliceSet, heldout_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Slice indices of ``train`` / ``heldout`` / ``test``, drawn by whole patients per site."""
    for name, f in (("heldout_fraction", heldout_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {f}")
    train_fraction = 1.0 - heldout_fraction - test_fraction
    if train_fraction <= 0:
        raise ConfigError(
            f"heldout_fraction={heldout_fraction} + test_fraction={test_fraction} leave no "
            "patients for training; lower them"
        )
    fractions = (train_fraction, heldout_fraction, test_fraction)
    parts = site_patient_split(slices, fractions, seed)
    return dict(zip(("train", "heldout", "test"), parts, strict=True))


def manifest_splits(slices: SliceSet, cases: Sequence) -> dict[str, np.ndarray] | None:
    """The manifest's own ``split`` column as train/heldout/test indices (None if unused)."""
    if not any(c.split for c in cases):
        return None
    named = predefined_split(slices, cases)
    unknown = sorted(set(named) - set(SPLIT_NAMES))
    if unknown:
        raise ConfigError(
            f"manifest split names {unknown} are not one of {sorted(SPLIT_NAMES)}; rename them"
        )
    out = {k: np.zeros(0, np.int64) for k in ("train", "heldout", "test")}
    for name, idx in named.items():
        out[SPLIT_NAMES[name]] = np.union1d(out[SPLIT_NAMES[name]], idx)
    return out


def federate_slices(
    slices: SliceSet,
    splits: dict[str, np.ndarray],
    *,
    num_classes: int,
    name: str,
    pad_multiple: int = 1,
) -> FederatedData:
    """One client per site (``slices.sites`` order) from train/heldout/test slice indices.

    ``pad_multiple`` pads every client to a multiple of examples (e.g. the batch size); the
    test split is the union of every site's test patients.
    """
    if not len(splits["train"]):
        raise ConfigError("no training slices: every patient went to heldout/test")
    examples = slice_examples(slices)
    clients = site_indices(slices)
    per_split = {
        split: [np.intersect1d(c, splits[split]) for c in clients] for split in ("train", "heldout")
    }
    empty = [slices.sites[k] for k, ix in enumerate(per_split["train"]) if not ix.size]
    if empty:
        raise ConfigError(
            f"sites {empty} have no training slices; give each site at least one training "
            "patient (more patients, or lower heldout/test fractions)"
        )
    return FederatedData(
        train=stack_clients(examples, per_split["train"], pad_multiple),
        heldout=stack_clients(examples, per_split["heldout"], pad_multiple),
        test=slice_examples(slices, splits["test"]),
        num_classes=num_classes,
        name=name,
    )
