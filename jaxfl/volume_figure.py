"""Figure: each site's acquisition shift on one of its volumes, in three orthogonal mid-slices."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import ml_collections
import numpy as np
from matplotlib.figure import Figure

from jaxfl import factories
from jaxfl.data.heterogeneity import TRAIN_STREAM, AcquisitionShift, apply_shift
from jaxfl.train import load_federated_data

PLANES = ("axial", "coronal", "sagittal")


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices of ``volume [D, H, W]`` (or ``[D, H, W, 1]``)."""
    v = np.asarray(volume)
    v = v[..., 0] if v.ndim == 4 else v
    d, h, w = v.shape
    return [v[d // 2], v[:, h // 2, :], v[:, :, w // 2]]


def site_volumes(
    config: ml_collections.ConfigDict,
) -> tuple[list[np.ndarray], list[np.ndarray], list[AcquisitionShift]]:
    """Per client: its first training volume before and after its scanner shift
    (``[D, H, W, C]`` each, the shift exactly as training applies it: same noise draw), and
    the shifts."""
    plain = config.copy_and_resolve_references()
    with plain.unlocked():
        plain.heterogeneity.preset = ""
        plain.heterogeneity.strength = 0.0
        plain.heterogeneity.clients = []
    fed = load_federated_data(plain)
    images = np.asarray(fed.train.examples["image"])
    if images.ndim != 6:
        raise ValueError(
            f"{config.data.name} holds 2D images {images.shape[2:]}; this figure is for volumes"
        )
    shifts = factories.build_shifts(config, is_3d=True)
    counts = np.asarray(fed.train.counts)
    before, after = [], []
    for c, shift in enumerate(shifts):
        # The client's real volumes go through its scanner as in training (same noise draw).
        real = images[c, : max(int(counts[c]), 1)]
        shifted = apply_shift(real, shift, seed=config.seed, client_id=c, stream=TRAIN_STREAM)
        after.append(shifted[0])
        before.append(real[0])
    return before, after, shifts


def describe(shift: AcquisitionShift) -> str:
    """The settings of ``shift`` that differ from the identity, e.g. ``slice_thickness=5``."""
    identity = AcquisitionShift()
    changed = [
        f"{f.name}={getattr(shift, f.name):g}"
        for f in dataclasses.fields(shift)
        if f.name != "slice_mode" and getattr(shift, f.name) != getattr(identity, f.name)
    ]
    return ", ".join(changed) or "unchanged"


def plot_volume_shifts(
    config: ml_collections.ConfigDict, out: str | os.PathLike, title: str | None = None
) -> Path:
    """One row per site: mid-slices of one volume before (left) and after (right) its shift."""
    before, after, shifts = site_volumes(config)
    rows = len(before)
    fig = Figure(figsize=(12, 2.1 * rows + 0.7))
    axes = fig.subplots(rows, 6, squeeze=False)
    for c in range(rows):
        panels = mid_slices(before[c]) + mid_slices(after[c])
        for j, (ax, img) in enumerate(zip(axes[c], panels, strict=True)):
            ax.imshow(img, cmap="gray", vmin=-1.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(f"{PLANES[j % 3]}, {'before' if j < 3 else 'after'}", fontsize=9)
        axes[c, 0].set_ylabel(f"site {c}\n{describe(shifts[c])}", fontsize=8)
    fig.suptitle(title or f"{config.data.name}: one volume per site, before / after its scanner")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
