"""Synthetic chest-CT phantoms with infection masks, for tests and the debug config.

A phantom is a stack of axial slices ``[Z, H, W]`` in HU, laid out like
:func:`jaxfl.data.ct.load_volume`'s output (Z inferior -> superior, rows anterior ->
posterior, columns patient right -> left): air (-1000 HU) around a body ellipse of soft tissue
(~20 HU), two lung ellipses (~-850 HU) that taper towards the apex and are absent in the
lowest (abdominal) slices, and ellipsoid lesions of ground-glass density (-500..-200 HU) inside
the lungs, which are the mask's label 1. Lung masks use COVID-19-CT-Seg's labels (1 left,
2 right lung).

Each site's scanner is a :class:`SiteProtocol` applied in HU, in acquisition order: slice
thickness (box average of adjacent slices on the same slice grid, so the mask grid is
unchanged), in-plane resolution loss, blur, HU offset, noise, then rounding to whole HU as
scanners store it. :func:`phantom_slices` sends the volumes through
:func:`jaxfl.data.ct.preprocess_volume`, the same function real files go through, and
:func:`write_phantoms` writes them as NIfTI in the manifest or MSD layout so tests can run the
file path end to end. Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import scipy.ndimage

from jaxfl.data.ct import (
    CTPreprocess,
    SliceSet,
    concat,
    preprocess_volume,
    resize_slices,
    slices_to_canonical,
)

AIR_HU = -1000.0
SOFT_TISSUE_HU = 20.0
LUNG_HU = -850.0
LESION_HU_RANGE = (-500.0, -200.0)
# (dz, dh, dw) in mm of written phantoms: 5 mm slices, 1 mm pixels at 64x64 scale.
PHANTOM_SPACING = (5.0, 1.0, 1.0)
LAYOUTS = ("manifest", "msd")
# Orientation written files are stored in: DICOM's LPS, so reading exercises canonicalization.
WRITE_ORIENTATION = ("L", "P", "S")
_PHANTOM_SALT = 0x9A47


@dataclasses.dataclass(frozen=True)
class SiteProtocol:
    """One site's acquisition, in HU; the defaults are the identity.

    ``hu_offset``: calibration bias (HU); ``noise_std``: Gaussian noise std (HU);
    ``blur_sigma``: in-plane Gaussian PSF std (pixels); ``downsample >= 1``: in-plane resolution
    loss (down by this factor and back, linearly); ``slice_thickness >= 1``: adjacent slices
    averaged along the axial axis.
    """

    hu_offset: float = 0.0
    noise_std: float = 0.0
    blur_sigma: float = 0.0
    downsample: float = 1.0
    slice_thickness: int = 1


# Five scanners, one per PPPML-HMI hospital; sites beyond five reuse them cyclically.
DEFAULT_PROTOCOLS = (
    SiteProtocol(noise_std=10.0),
    SiteProtocol(hu_offset=40.0, noise_std=25.0),
    SiteProtocol(noise_std=40.0, blur_sigma=1.0),
    SiteProtocol(hu_offset=-30.0, noise_std=15.0, downsample=2.0),
    SiteProtocol(noise_std=20.0, blur_sigma=0.7, slice_thickness=3),
)


class Phantom(NamedTuple):
    """One phantom: ``image [Z, H, W]`` float32 HU, ``mask`` and ``lung [Z, H, W]`` int32."""

    image: np.ndarray
    mask: np.ndarray
    lung: np.ndarray


def _grid(num_slices: int, size: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Pixel-centre coordinates in [-1, 1]: z ``[Z, 1, 1]``, y ``[1, H, 1]``, x ``[1, 1, W]``."""

    def axis(n: int) -> np.ndarray:
        return (np.arange(n) + 0.5) / n * 2.0 - 1.0

    z, y, x = axis(num_slices), axis(size[0]), axis(size[1])
    return z[:, None, None], y[None, :, None], x[None, None, :]


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: Any, rx: Any) -> np.ndarray:
    """Boolean inside of an axis-aligned ellipse (radii may broadcast over slices)."""
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def phantom_anatomy(
    rng: np.random.Generator, size: tuple[int, int] = (64, 64), num_slices: int = 16
) -> Phantom:
    """A noise-free phantom drawn from ``rng``: HU image, lesion mask and lung mask."""
    z, y, x = _grid(num_slices, size)
    body = _ellipse(y, x, 0.0, 0.0, 0.75 * rng.uniform(0.95, 1.05), 0.92 * rng.uniform(0.95, 1.05))
    # Lungs span the upper part of the stack, widest a little above the middle.
    top, reach = rng.uniform(0.2, 0.3), rng.uniform(0.75, 0.85)
    taper = np.sqrt(np.clip(1.0 - ((z - top) / reach) ** 2, 0.0, None))
    ry, rx = 0.48 * taper + 1e-6, 0.26 * taper + 1e-6
    # Image columns run patient right -> left: the left half holds the right lung (label 2).
    lung = np.zeros((num_slices, *size), np.int32)
    lung[np.broadcast_to(_ellipse(y, x, -0.02, -0.4, ry, rx), lung.shape)] = 2
    lung[np.broadcast_to(_ellipse(y, x, -0.02, 0.4, ry, rx), lung.shape)] = 1
    image = np.where(body, SOFT_TISSUE_HU + rng.normal(0.0, 5.0), AIR_HU)
    image = np.where(lung > 0, LUNG_HU + rng.normal(0.0, 10.0), image).astype(np.float32)
    mask = np.zeros(lung.shape, np.int32)
    lung_voxels = np.flatnonzero(lung)
    for _ in range(int(rng.integers(2, 6)) if lung_voxels.size else 0):
        cz, cy, cx = np.unravel_index(rng.choice(lung_voxels), lung.shape)
        # Radii in pixels (scaled with the image) and slices: small nodules to large patches.
        r_hw = rng.uniform(1.5, 6.0) * min(size) / 64.0
        r_z = rng.uniform(0.8, 3.0)
        zz, yy, xx = np.ogrid[: lung.shape[0], : size[0], : size[1]]
        blob = ((zz - cz) / r_z) ** 2 + ((yy - cy) / r_hw) ** 2 + ((xx - cx) / r_hw) ** 2 <= 1.0
        lesion = blob & (lung > 0)
        image[lesion] = rng.uniform(*LESION_HU_RANGE)
        mask[lesion] = 1
    return Phantom(image=image, mask=mask, lung=lung)


def apply_protocol(hu: np.ndarray, protocol: SiteProtocol, rng: np.random.Generator) -> np.ndarray:
    """One site's acquisition of a ``[Z, H, W]`` HU volume (see the module docstring)."""
    out = np.asarray(hu, np.float32)
    if protocol.slice_thickness > 1:
        out = scipy.ndimage.uniform_filter1d(out, protocol.slice_thickness, axis=0, mode="nearest")
    if protocol.downsample > 1.0:
        size = out.shape[1:]
        low = tuple(max(1, round(s / protocol.downsample)) for s in size)
        out = resize_slices(resize_slices(out, low, order=1), size, order=1)
    if protocol.blur_sigma > 0.0:
        out = scipy.ndimage.gaussian_filter(out, (0.0, protocol.blur_sigma, protocol.blur_sigma))
    out = out + np.float32(protocol.hu_offset)
    if protocol.noise_std > 0.0:
        out = out + rng.normal(0.0, protocol.noise_std, out.shape).astype(np.float32)
    return np.rint(out).astype(np.float32)


def make_phantom(
    seed: int = 0,
    site: int = 0,
    patient: int = 0,
    *,
    size: tuple[int, int] = (64, 64),
    num_slices: int = 16,
    protocol: SiteProtocol | None = None,
) -> Phantom:
    """Patient ``patient`` of site ``site`` (``protocol`` defaults to the site's default).

    Deterministic in ``(seed, site, patient)`` alone, so any subset is reproducible.
    """
    protocol = DEFAULT_PROTOCOLS[site % len(DEFAULT_PROTOCOLS)] if protocol is None else protocol
    rng = np.random.default_rng([seed, _PHANTOM_SALT, site, patient])
    clean = phantom_anatomy(rng, size, num_slices)
    return clean._replace(image=apply_protocol(clean.image, protocol, rng))


def _protocol(site: int, protocols: Sequence[SiteProtocol] | None) -> SiteProtocol:
    """Site ``site``'s protocol from ``protocols`` (cyclic), else the defaults."""
    table = DEFAULT_PROTOCOLS if protocols is None else tuple(protocols)
    return table[site % len(table)]


def phantom_names(site: int, patient: int) -> tuple[str, str]:
    """(patient name, site name) of a phantom: ``("site2_p1", "site2")``."""
    return f"site{site}_p{patient}", f"site{site}"


def phantom_slices(
    num_sites: int = 5,
    patients_per_site: int = 4,
    *,
    num_slices: int = 16,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    protocols: Sequence[SiteProtocol] | None = None,
    config: CTPreprocess | None = None,
) -> SliceSet:
    """Phantoms for every (site, patient), preprocessed like real data into one SliceSet."""
    parts = []
    for s in range(num_sites):
        for p in range(patients_per_site):
            ph = make_phantom(
                seed, s, p, size=size, num_slices=num_slices, protocol=_protocol(s, protocols)
            )
            patient, site = phantom_names(s, p)
            parts.append(
                preprocess_volume(
                    ph.image,
                    ph.mask,
                    config,
                    patient=patient,
                    site=site,
                    lung=ph.lung,
                    source=f"phantom {patient}",
                )
            )
    return concat(parts)


def to_nifti(
    stack: np.ndarray,
    spacing: tuple[float, float, float] = PHANTOM_SPACING,
    *,
    dtype: type = np.int16,
    orientation: tuple[str, str, str] = WRITE_ORIENTATION,
) -> nib.Nifti1Image:
    """Axial slices ``[Z, H, W]`` (ct's display layout) -> a NIfTI image stored in
    ``orientation`` with voxel sizes ``spacing = (dz, dh, dw)`` mm."""
    dz, dh, dw = spacing
    ras = nib.Nifti1Image(
        slices_to_canonical(np.asarray(stack)).astype(dtype), np.diag([dw, dh, dz, 1.0])
    )
    transform = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(orientation)
    )
    img = ras.as_reoriented(transform)
    img.header.set_xyzt_units("mm")
    return img


def _save(img: nib.Nifti1Image, path: Path) -> None:
    """``nib.save`` after creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _write_msd_json(folder: Path, name: str, num_training: int) -> None:
    """An nnU-Net v2 style ``dataset.json`` for one site's folder."""
    meta = {
        "name": name,
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))


def write_phantoms(
    root: str | os.PathLike[str],
    layout: str = "manifest",
    num_sites: int = 2,
    patients_per_site: int = 2,
    *,
    num_slices: int = 16,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    protocols: Sequence[SiteProtocol] | None = None,
) -> list[Path]:
    """Write phantoms as NIfTI (LPS-stored) in ``layout``; returns what to discover.

    Images are int16 HU, masks uint8. ``"manifest"``: ``root/{images,masks,lungs}/NAME.nii.gz``
    and ``root/manifest.csv`` (with a ``lung`` column) -> ``[manifest.csv]``. ``"msd"``: one
    nnU-Net folder per site, ``root/siteK/{imagesTr/NAME_0000,labelsTr/NAME}.nii.gz`` +
    ``dataset.json`` (no lung masks, as in MSD) -> the site folders.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    root = Path(root)
    rows, site_dirs = [], []
    for s in range(num_sites):
        site_dir = root / f"site{s}"
        for p in range(patients_per_site):
            ph = make_phantom(
                seed, s, p, size=size, num_slices=num_slices, protocol=_protocol(s, protocols)
            )
            patient, site = phantom_names(s, p)
            if layout == "manifest":
                image, mask, lung = (f"{d}/{patient}.nii.gz" for d in ("images", "masks", "lungs"))
                _save(to_nifti(ph.lung, dtype=np.uint8), root / lung)
                rows.append([image, mask, patient, site, "", lung])
                folder = root
            else:
                image, mask = f"imagesTr/{patient}_0000.nii.gz", f"labelsTr/{patient}.nii.gz"
                folder = site_dir
            _save(to_nifti(ph.image, dtype=np.int16), folder / image)
            _save(to_nifti(ph.mask, dtype=np.uint8), folder / mask)
        if layout == "msd":
            _write_msd_json(site_dir, f"site{s}", patients_per_site)
            site_dirs.append(site_dir)
    if layout == "msd":
        return site_dirs
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mask", "patient", "site", "split", "lung"])
        writer.writerows(rows)
    return [manifest]
