"""CT volumes for 3D classification: RAD-ChestCT tables + .npz scans, NIfTI CSVs, resampling."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
from helpers import fake_ct_scan, write_radchest

from jaxfl.data.ct import MissingCTDataError
from jaxfl.data.volumes import (
    RADCHEST_URL,
    VolumePreprocess,
    box_resample,
    discover_radchest,
    global_test_indices,
    load_volumes,
    preprocess,
    read_volume_csv,
    volume_dataset,
)
from jaxfl.errors import ConfigError, DataFileError


@pytest.fixture
def radchest(tmp_path):
    """The release's layout: tables under tables/, scans under images/ (different sizes)."""
    return write_radchest(tmp_path)


def test_radchest_reader_labels_sites_and_files(radchest):
    cases = discover_radchest(radchest)
    assert [c.path.name for c in cases][:2] == ["trn00001.npz", "trn00002.npz"]
    assert [c.label for c in cases] == [0, 1, 1, 1, 0, 1, 0]  # any abnormality
    assert [c.site for c in cases] == ["train"] * 3 + ["valid"] * 2 + ["test"] * 2
    assert [c.label for c in discover_radchest(radchest, "nodule")] == [0, 1, 0, 1, 0, 0, 0]
    with pytest.raises(ConfigError, match=r"choose one of \['mass', 'nodule'\]"):
        discover_radchest(radchest, "emphysema")
    vs = load_volumes(cases, VolumePreprocess(shape=(8, 10, 9)))
    assert vs.image.shape == (7, 8, 10, 9, 1) and vs.image.dtype == np.float32
    assert vs.sites == ("train", "valid", "test") and list(vs.site) == [0, 0, 0, 1, 1, 2, 2]
    assert vs.image.min() >= -1.0 and vs.image.max() <= 1.0
    assert vs.image[0, 0, 0, 0, 0] == -1.0  # air at -1000 HU is the window's floor


def test_radchest_missing_files_name_the_download(radchest, tmp_path_factory):
    with pytest.raises(MissingCTDataError, match="6406114") as err:
        discover_radchest(tmp_path_factory.mktemp("empty"))
    assert RADCHEST_URL in str(err.value) and "NoteAcc_DEID" in str(err.value)
    (radchest / "images" / "val00002.npz").unlink()
    with pytest.raises(MissingCTDataError, match="val00002.npz"):
        discover_radchest(radchest)


def test_npz_with_other_arrays_is_refused(radchest):
    np.savez(radchest / "images" / "trn00001.npz", volume=np.zeros((4, 4, 4)), extra=np.zeros(2))
    with pytest.raises(DataFileError, match="holds arrays"):
        load_volumes(discover_radchest(radchest)[:1])


def test_resampling_keeps_orientation_and_hu_range():
    rng = np.random.default_rng(1)
    hu = rng.uniform(-1000.0, -500.0, (40, 36, 30)).astype(np.float32)
    # A bright block near the first slice, last rows and first columns; a ramp along axis 0.
    hu[:8, -9:, :6] = 2500.0
    ramp = np.linspace(-1000.0, 200.0, 40, dtype=np.float32)[:, None, None] * np.ones((1, 36, 30))
    pre = VolumePreprocess(shape=(10, 9, 12))
    out = preprocess(hu, pre)[..., 0]
    assert out.shape == (10, 9, 12) and out.min() >= -1.0 and out.max() <= 1.0
    bright = np.argwhere(out > 0.9).mean(axis=0)  # still near slice 0, last rows, first columns
    assert bright[0] < 2.5 and bright[1] > 6.5 and bright[2] < 2.5, bright
    wide = preprocess(rng.uniform(-1500.0, 3000.0, (40, 36, 30)), pre)
    assert wide.min() >= -1.0 and wide.max() <= 1.0
    r = preprocess(ramp, pre)[:, 4, 6, 0]
    assert np.all(np.diff(r) > 0) and r[0] > -1.0 - 1e-6 and r[-1] < 1.0 + 1e-6
    # HU clipped to the window: -1000 -> -1 and 200 -> 1, everything beyond stays at the ends.
    ends = preprocess(np.array([-3000.0, -1000.0, 200.0, 3000.0]).reshape(4, 1, 1), pre)
    np.testing.assert_allclose(ends[[0, -1], 0, 0, 0], [-1.0, 1.0], atol=1e-6)
    # Box filtering: a 4x reduction of a checkerboard averages it instead of sampling it.
    board = (np.indices((32, 32, 32)).sum(0) % 2).astype(np.float32)
    np.testing.assert_allclose(box_resample(board, (8, 8, 8)), 0.5, atol=0.1)


def _write_nifti(path, data):
    nib.save(nib.Nifti1Image(data.astype(np.int16), np.diag([0.8, 0.8, 2.5, 1.0])), path)


def test_nifti_volume_csv_with_sites_and_splits(tmp_path):
    rng = np.random.default_rng(2)
    rows = []
    for i in range(6):
        _write_nifti(tmp_path / f"v{i}.nii.gz", fake_ct_scan(rng, (16, 14, 10)).transpose(2, 1, 0))
        rows.append([f"v{i}.nii.gz", i % 2, f"h{i % 3}", "test" if i == 5 else "train"])
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "label", "site", "split"], *rows])
    cases = read_volume_csv(tmp_path / "labels.csv")
    vs = load_volumes(cases, VolumePreprocess(shape=(6, 8, 8)))
    assert vs.image.shape == (6, 6, 8, 8, 1) and vs.sites == ("h0", "h1", "h2")
    np.testing.assert_array_equal(
        global_test_indices(vs, 0.5, seed=0), [5]
    )  # the marked split wins
    dataset, train_site = volume_dataset(vs, 0.5, seed=0, name="csv")
    assert len(dataset.train.labels) == 5 and list(train_site) == [0, 1, 2, 0, 1]
    assert dataset.num_classes == 2
    with pytest.raises(ConfigError, match="num_classes"):
        volume_dataset(vs, 0.0, seed=0, num_classes=1)
    (tmp_path / "bad.csv").write_text("image,label\nv0.nii.gz,cat\n")
    with pytest.raises(DataFileError, match="not an integer class"):
        read_volume_csv(tmp_path / "bad.csv")
    with pytest.raises(MissingCTDataError, match="columns image"):
        read_volume_csv(tmp_path / "none.csv")


def test_per_site_test_split_and_memory_mapped_cache(radchest, tmp_path):
    cases = discover_radchest(radchest)
    pre = VolumePreprocess(shape=(6, 6, 6))
    vs = load_volumes(cases, pre, cache_dir=tmp_path / "cache")
    again = load_volumes(cases, pre, cache_dir=tmp_path / "cache")
    assert isinstance(again.image, np.memmap) and not again.image.flags.writeable
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(vs.image))
    assert len(list((tmp_path / "cache").iterdir())) == 1
    load_volumes(cases, VolumePreprocess(shape=(6, 6, 7)), cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2  # another shape, another entry
    test = global_test_indices(vs, 0.5, seed=3)
    assert sorted(np.bincount(vs.site[test], minlength=3)) == [1, 1, 1]  # floor(0.5 n) per site
