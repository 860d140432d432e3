"""Tests for jaxfl.data.phantoms: synthetic chest-CT phantoms and their acquisition shifts."""

from __future__ import annotations

import numpy as np
import pytest

from jaxfl.data.ct import CTPreprocess, preprocess_volume, window_hu
from jaxfl.data.phantoms import (
    AIR_HU,
    DEFAULT_PROTOCOLS,
    LESION_HU_RANGE,
    LUNG_HU,
    SOFT_TISSUE_HU,
    SiteProtocol,
    apply_protocol,
    make_phantom,
    phantom_anatomy,
    phantom_slices,
)


def _anatomies(n: int = 12, size=(64, 64), num_slices: int = 16):
    return [phantom_anatomy(np.random.default_rng(i), size, num_slices) for i in range(n)]


def test_phantoms_are_deterministic():
    a, b = make_phantom(7, 2, 1), make_phantom(7, 2, 1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(make_phantom(8, 2, 1).image, a.image)
    assert not np.array_equal(make_phantom(7, 2, 2).mask, a.mask)
    s1, s2 = (
        phantom_slices(2, 2, num_slices=4, size=(16, 16)),
        phantom_slices(2, 2, num_slices=4, size=(16, 16)),
    )
    np.testing.assert_array_equal(s1.image, s2.image)


def test_anatomy_values_and_layout():
    ph = _anatomies(1)[0]
    assert ph.image.shape == ph.mask.shape == ph.lung.shape == (16, 64, 64)
    assert ph.image.dtype == np.float32 and ph.mask.dtype == np.int32
    assert ph.image[:, 0, 0].tolist() == [AIR_HU] * 16  # corners are air
    body = (ph.image > -500) & (ph.mask == 0)
    assert abs(np.median(ph.image[body]) - SOFT_TISSUE_HU) < 20
    assert set(np.unique(ph.lung)) == {0, 1, 2}
    # Patient right (label 2) on the image's left, as ct's slice view has it.
    assert np.argwhere(ph.lung == 2)[:, 2].mean() < 32 < np.argwhere(ph.lung == 1)[:, 2].mean()
    has_lung = (ph.lung > 0).any(axis=(1, 2))
    assert not has_lung[0] and has_lung[-4:].all()  # no lung in the lowest slices


def test_lesions_lie_inside_lungs_and_match_the_mask():
    for ph in _anatomies():
        lesion = ph.mask > 0
        assert lesion.sum() > 0
        assert np.all(ph.lung[lesion] > 0)
        lo, hi = LESION_HU_RANGE
        assert np.all((ph.image[lesion] >= lo) & (ph.image[lesion] <= hi))
        healthy_lung = (ph.lung > 0) & ~lesion
        assert np.all(np.abs(ph.image[healthy_lung] - LUNG_HU) < 50)
        assert set(np.unique(ph.mask)) == {0, 1}


def test_lesion_sizes_and_contrasts_vary():
    sizes, contrasts = [], []
    for ph in _anatomies(20):
        sizes.append(int((ph.mask > 0).sum()))
        contrasts.extend(np.unique(ph.image[ph.mask > 0]).tolist())
    assert max(sizes) > 4 * min(sizes)
    assert np.ptp(contrasts) > 150


def test_protocol_identity_offset_and_noise():
    ph = _anatomies(1)[0]
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(apply_protocol(ph.image, SiteProtocol(), rng), np.rint(ph.image))
    shifted = apply_protocol(ph.image, SiteProtocol(hu_offset=40.0), rng)
    np.testing.assert_allclose(shifted - np.rint(ph.image), 40.0)
    noisy = apply_protocol(ph.image, SiteProtocol(noise_std=30.0), rng)
    air = ph.image == AIR_HU
    assert 27 < np.std(noisy[air]) < 33


def test_protocol_thickness_blur_and_resolution():
    impulse = np.full((9, 16, 16), -850.0, np.float32)
    impulse[4, 8, 8] = 2150.0  # +3000 HU in one voxel
    thick = apply_protocol(impulse, SiteProtocol(slice_thickness=3), np.random.default_rng(0))
    np.testing.assert_allclose(thick[3:6, 8, 8], [150.0, 150.0, 150.0])  # spread over 3 slices
    np.testing.assert_allclose(thick[[2, 6], 8, 8], [-850.0, -850.0])
    ph = _anatomies(1)[0]

    def edge_energy(x: np.ndarray) -> float:
        # Squared differences: blur spreads an edge, lowering this (total variation would not).
        return float((np.diff(x, axis=2) ** 2).sum())

    sharp = edge_energy(np.rint(ph.image))
    for protocol in (SiteProtocol(blur_sigma=1.0), SiteProtocol(downsample=2.0)):
        out = apply_protocol(ph.image, protocol, np.random.default_rng(0))
        assert out.shape == ph.image.shape
        assert edge_energy(out) < 0.9 * sharp


def test_phantom_slices_go_through_preprocess_volume():
    config = CTPreprocess(size=(32, 32))
    slices = phantom_slices(5, 4, config=config)
    assert slices.image.shape == (5 * 4 * 16, 32, 32, 1) and slices.image.dtype == np.float32
    assert len(slices.sites) == 5 and len(slices.patients) == 20
    assert slices.image.min() >= -1.0 and slices.image.max() <= 1.0
    ph = make_phantom(0, 3, 2, protocol=DEFAULT_PROTOCOLS[3])
    direct = preprocess_volume(ph.image, ph.mask, config, patient="x", site="y")
    at = slices.patient == slices.patients.index("site3_p2")
    np.testing.assert_array_equal(slices.image[at], direct.image)
    np.testing.assert_array_equal(slices.mask[at], direct.mask)
    # Lesions are brighter than the lung around them after windowing.
    native = phantom_slices(2, 2)
    assert native.image[native.mask > 0].mean() > window_hu(np.array(LUNG_HU)) + 0.2


def test_phantom_slices_lung_only():
    full = phantom_slices(2, 2)
    lung = phantom_slices(2, 2, config=CTPreprocess(lung_only=True))
    assert 0 < lung.num_slices < full.num_slices
    assert lung.mask.sum() == full.mask.sum()  # lesions only occur in slices with lung


@pytest.mark.parametrize("site", range(5))
def test_sites_differ(site):
    clean = make_phantom(0, site, 0, protocol=SiteProtocol())
    shifted = make_phantom(0, site, 0)
    np.testing.assert_array_equal(clean.mask, shifted.mask)
    assert not np.array_equal(clean.image, shifted.image)
