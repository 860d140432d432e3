"""Tests for jaxfl.data.ct: NIfTI/PNG reading, preprocessing, layouts, splits, cache."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from jaxfl.data import ct
from jaxfl.data.ct import (
    NO_SLICE_INDEX,
    CaseSpec,
    CTPreprocess,
    MissingCTDataError,
    SliceSet,
    concat,
    detect_intensity,
    discover_covid19_ct_seg,
    discover_msd,
    load_cases,
    load_totalseg_example,
    load_volume,
    partition_by_patient,
    patient_split,
    predefined_split,
    preprocess_volume,
    read_manifest,
    remap_labels,
    resize_slices,
    site_indices,
    site_patient_split,
    take,
    window_hu,
)
from jaxfl.data.phantoms import phantom_slices, write_phantoms
from jaxfl.errors import ConfigError, DataFileError, UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``data`` as NIfTI at ``path`` (folders created); identity affine by default."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _volume(shape=(6, 5, 3), fill=-600.0) -> np.ndarray:
    """A small int16 HU volume [X, Y, Z] with air corners."""
    data = np.full(shape, fill, np.int16)
    data[0, 0, :] = -1000
    return data


def _shared_data_dir() -> Path | None:
    """Folder with the TotalSegmentator example pair: $JAXFL_DATA_DIR, else ../shared/data."""
    for candidate in (os.environ.get("JAXFL_DATA_DIR"), REPO_ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / ct.TOTALSEG_EXAMPLE_IMAGE).is_file():
            return Path(candidate)
    return None


# --------------------------------------------------------------------------- NIfTI reading


def test_nifti_round_trip_canonicalizes_flipped_and_permuted_axes(tmp_path):
    X, Y, Z = 5, 4, 3
    dx, dy, dz = 0.7, 0.8, 2.5
    ras = np.arange(X * Y * Z, dtype=np.float32).reshape(X, Y, Z) - 40.0
    ras_affine = np.array([[dx, 0, 0, -10], [0, dy, 0, 20], [0, 0, dz, 30], [0, 0, 0, 1.0]])
    # LPS (as DICOM converters write): flip x and y, moving the origin to the far corner.
    lps_affine = ras_affine.copy()
    lps_affine[:3, :2] *= -1
    lps_affine[:3, 3] += ras_affine[:3, 0] * (X - 1) + ras_affine[:3, 1] * (Y - 1)
    # Axes stored as (z, x, y): the affine's columns permute the same way.
    perm_affine = ras_affine[:, [2, 0, 1, 3]]
    paths = [
        _save(tmp_path / "ras.nii.gz", ras, ras_affine),
        _save(tmp_path / "lps.nii.gz", ras[::-1, ::-1, :].copy(), lps_affine),
        _save(tmp_path / "zxy.nii.gz", ras.transpose(2, 0, 1).copy(), perm_affine),
    ]
    # Axial slice z, row r (anterior first), column c (patient right first).
    expected = np.empty((Z, Y, X), np.float32)
    for z in range(Z):
        for r in range(Y):
            for c in range(X):
                expected[z, r, c] = ras[X - 1 - c, Y - 1 - r, z]
    for path in paths:
        vol = load_volume(path)
        np.testing.assert_array_equal(vol.data, expected, err_msg=str(path))
        assert vol.data.dtype == np.float32
        np.testing.assert_allclose(vol.spacing, (dz, dy, dx), rtol=1e-6)
        assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
        np.testing.assert_allclose(vol.affine, ras_affine, atol=1e-5)


def test_load_volume_rejects_4d_and_garbage(tmp_path):
    _save(tmp_path / "4d.nii.gz", np.zeros((3, 3, 3, 2), np.float32))
    with pytest.raises(DataFileError, match="4D"):
        load_volume(tmp_path / "4d.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataFileError, match="bad.nii.gz"):
        load_volume(tmp_path / "bad.nii.gz")
    with pytest.raises(MissingCTDataError, match="gone.nii.gz"):
        load_volume(tmp_path / "gone.nii.gz")
    # A gzip cut short mid-stream (an interrupted download).
    _save(tmp_path / "ok.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)))
    (tmp_path / "cut.nii.gz").write_bytes((tmp_path / "ok.nii.gz").read_bytes()[:3000])
    with pytest.raises(DataFileError, match="cut.nii.gz"):
        load_volume(tmp_path / "cut.nii.gz")


def test_mask_shape_mismatch_names_both_files(tmp_path):
    image = _save(tmp_path / "img.nii.gz", _volume((6, 5, 3)))
    mask = _save(tmp_path / "seg.nii.gz", np.zeros((6, 5, 4), np.uint8))
    with pytest.raises(DataFileError) as err:
        ct.load_case(CaseSpec(image, mask, "p", "s"))
    assert str(image) in str(err.value) and str(mask) in str(err.value)
    assert "shape" in str(err.value)


def test_mask_affine_mismatch_names_both_files(tmp_path):
    image = _save(tmp_path / "img.nii.gz", _volume((6, 5, 3)))
    shifted = np.eye(4)
    shifted[0, 3] = 0.5  # half a voxel: another grid
    mask = _save(tmp_path / "seg.nii.gz", np.zeros((6, 5, 3), np.uint8), shifted)
    with pytest.raises(DataFileError) as err:
        ct.load_case(CaseSpec(image, mask, "p", "s"))
    assert str(image) in str(err.value) and str(mask) in str(err.value)
    assert "affine" in str(err.value)
    # float32 round-off (1e-5 of a 1 mm voxel) is the same grid.
    shifted[0, 3] = 1e-5
    _save(tmp_path / "seg.nii.gz", np.zeros((6, 5, 3), np.uint8), shifted)
    assert ct.load_case(CaseSpec(image, mask, "p", "s")).num_slices == 3


# --------------------------------------------------------------------------- preprocessing


def test_window_hu_at_known_values():
    hu = np.array([-2000.0, -1350.0, -1000.0, -600.0, 0.0, 150.0, 1000.0])
    expected = [-1.0, -1.0, 2 * 350 / 1500 - 1, 0.0, 2 * 1350 / 1500 - 1, 1.0, 1.0]
    out = window_hu(hu)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(window_hu(np.array([40.0, -160, 240]), 40, 400), [0, -1, 1])


def test_detect_intensity_rule():
    assert detect_intensity(np.array([-1000.0, 40.0])) == "hu"
    assert detect_intensity(np.array([0.0, 300.0])) == "hu"  # above 255: not 8-bit
    assert detect_intensity(np.array([0.0, 17.0, 255.0])) == "grey"
    assert detect_intensity(np.array([3.0, 200.0])) == "grey"
    with pytest.raises(DataFileError, match=r"\[0, 1\]"):
        detect_intensity(np.array([0.0, 0.5, 1.0]))


def test_preprocess_maps_grey_linearly_and_hu_through_window():
    mask = np.zeros((1, 1, 3), np.int32)
    grey = preprocess_volume(np.array([[[0.0, 127.5, 255.0]]]), mask, patient="p", site="s")
    np.testing.assert_allclose(grey.image[0, 0, :, 0], [-1.0, 0.0, 1.0], atol=1e-6)
    hu = preprocess_volume(np.array([[[-1350.0, -600.0, 150.0]]]), mask, patient="p", site="s")
    np.testing.assert_allclose(hu.image[0, 0, :, 0], [-1.0, 0.0, 1.0], atol=1e-6)
    # Forcing "hu" on grey levels windows them as HU: everything lands near the top.
    forced = preprocess_volume(
        np.array([[[0.0, 127.5, 255.0]]]), mask, CTPreprocess(intensity="hu"), patient="p", site="s"
    )
    assert forced.image.min() > 0.7


def test_resize_keeps_mask_labels_integer():
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array([0, 1, 2, 7]), size=(2, 10, 10)).astype(np.int32)
    for size in [(7, 13), (20, 20), (5, 5)]:
        out = resize_slices(labels, size, order=0)
        assert out.shape == (2, *size) and out.dtype == np.int32
        assert set(np.unique(out)) <= {0, 1, 2, 7}
    # Halving averages 2x2 blocks (pixel areas aligned).
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    np.testing.assert_allclose(resize_slices(image, (2, 2), order=1)[0], [[2.5, 4.5], [10.5, 12.5]])
    # Through preprocess_volume too: the mask stays int32 labels, the image interpolates.
    hu = np.where(labels > 0, -300.0, -850.0)
    out = preprocess_volume(hu, labels, CTPreprocess(size=(7, 13)), patient="p", site="s")
    assert out.image.shape == (2, 7, 13, 1) and out.mask.shape == (2, 7, 13)
    assert out.mask.dtype == np.int32 and set(np.unique(out.mask)) <= {0, 1, 2, 7}


def test_label_map_keeps_listed_labels_only():
    mask = np.array([[[0, 3, 5, 5, 117]]])
    np.testing.assert_array_equal(remap_labels(mask, ((5, 1),)), [[[0, 0, 1, 1, 0]]])
    np.testing.assert_array_equal(remap_labels(mask, None), mask)
    config = CTPreprocess(label_map={5: 1, 3: 2})
    assert config.label_map == ((3, 2), (5, 1))
    out = preprocess_volume(np.full(mask.shape, -600.0), mask, config, patient="p", site="s")
    np.testing.assert_array_equal(out.mask, [[[0, 2, 1, 1, 0]]])


def test_float_mask_must_hold_integers():
    with pytest.raises(DataFileError, match="non-integer"):
        preprocess_volume(np.zeros((1, 2, 2)) - 600, np.full((1, 2, 2), 0.5), patient="p", site="s")
    out = preprocess_volume(np.zeros((1, 2, 2)) - 600, np.ones((1, 2, 2)), patient="p", site="s")
    assert out.mask.dtype == np.int32 and out.mask.sum() == 4


def test_lung_only_keeps_slices_with_lung():
    image = np.full((5, 4, 4), -850.0)
    mask = np.zeros((5, 4, 4), np.int32)
    mask[3, 1, 1] = 12  # a lung label in slice 3 only
    lung = np.zeros((5, 4, 4), np.int32)
    lung[1:3, 2, 2] = 1
    out = preprocess_volume(
        image, mask, CTPreprocess(lung_only=True), patient="p", site="s", lung=lung
    )
    np.testing.assert_array_equal(out.slice_index, [1, 2])
    by_label = preprocess_volume(
        image, mask, CTPreprocess(lung_only=True, lung_labels=(10, 12)), patient="p", site="s"
    )
    np.testing.assert_array_equal(by_label.slice_index, [3])
    with pytest.raises(ConfigError, match="lung mask"):
        preprocess_volume(image, mask, CTPreprocess(lung_only=True), patient="p", site="s")
    with pytest.raises(ConfigError, match="lung_only"):
        CTPreprocess(lung_labels=(10,))


def test_config_validation():
    with pytest.raises(ConfigError, match="intensity"):
        CTPreprocess(intensity="ct")
    with pytest.raises(ConfigError, match="size"):
        CTPreprocess(size=(0, 4))
    with pytest.raises(ConfigError, match="window_width"):
        CTPreprocess(window_width=0)
    assert CTPreprocess(size=[8, 8]) == CTPreprocess(size=(8, 8))


# --------------------------------------------------------------------------- layouts


def _covid_tree(root: Path) -> None:
    """A tiny COVID-19-CT-Seg tree as unzipped from Zenodo, with macOS junk and the combined
    lung+infection folder."""
    images = root / "COVID-19-CT-Seg_20cases"
    hu = _volume()
    grey = np.full((6, 5, 3), 255, np.uint8)
    grey[0, 0, :] = 0
    _save(images / "coronacases_org_001.nii.gz", hu)
    _save(images / "coronacases_org_case007.nii.gz", hu)
    for study in ("4_85506_1", "10_85902_1", "10_85902_3"):
        _save(images / f"radiopaedia_org_covid-19-pneumonia-{study}-dcm.nii.gz", grey)
    names = [
        "coronacases_001",
        "coronacases_007",
        "radiopaedia_4_85506_1",
        "radiopaedia_10_85902_1",
        "radiopaedia_10_85902_3",
    ]
    for name in names:
        _save(root / "Infection_Mask" / f"{name}.nii.gz", np.ones((6, 5, 3), np.uint8))
        _save(root / "Lung_Mask" / f"{name}.nii.gz", np.full((6, 5, 3), 2, np.uint8))
        _save(root / "Lung_and_Infection_Mask" / f"{name}.nii.gz", np.full((6, 5, 3), 3, np.uint8))
    junk = root / "__MACOSX" / "Infection_Mask" / "._coronacases_001.nii.gz"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"\x00")


def test_covid19_ct_seg_discovery_pairs_and_sites(tmp_path):
    _covid_tree(tmp_path)
    cases = discover_covid19_ct_seg(tmp_path, lung_masks=True)
    by_image = {c.image.name: c for c in cases}
    assert len(cases) == 5
    corona = by_image["coronacases_org_001.nii.gz"]
    assert corona.mask == tmp_path / "Infection_Mask" / "coronacases_001.nii.gz"
    assert corona.lung == tmp_path / "Lung_Mask" / "coronacases_001.nii.gz"
    assert (corona.patient, corona.site) == ("coronacases_001", "coronacases")
    assert by_image["coronacases_org_case007.nii.gz"].mask.name == "coronacases_007.nii.gz"
    radio = by_image["radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm.nii.gz"]
    assert radio.mask == tmp_path / "Infection_Mask" / "radiopaedia_4_85506_1.nii.gz"
    assert (radio.patient, radio.site) == ("radiopaedia_4", "radiopaedia")
    # Two series of Radiopaedia case 10 are one patient.
    assert sum(c.patient == "radiopaedia_10" for c in cases) == 2
    assert all(c.mask.parent.name == "Infection_Mask" for c in cases)
    assert discover_covid19_ct_seg(tmp_path)[0].lung is None

    slices = load_cases(cases, CTPreprocess(lung_only=True))
    assert slices.num_slices == 15 and set(slices.sites) == {"coronacases", "radiopaedia"}
    corona_px = slices.image[slices.site == slices.sites.index("coronacases")]
    radio_px = slices.image[slices.site == slices.sites.index("radiopaedia")]
    # HU -600 -> 0 and -1000 -> -0.533 through the lung window; grey 255 -> 1 and 0 -> -1.
    np.testing.assert_allclose(np.unique(corona_px), [2 * 350 / 1500 - 1, 0.0], atol=1e-6)
    np.testing.assert_allclose(np.unique(radio_px), [-1.0, 1.0], atol=1e-6)
    assert set(np.unique(slices.mask)) == {1}


def test_covid19_ct_seg_missing_gives_zenodo_and_layout(tmp_path):
    for root in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(MissingCTDataError) as err:
            discover_covid19_ct_seg(root)
        message = str(err.value)
        assert "https://zenodo.org/records/3757476" in message
        assert "Infection_Mask" in message and "coronacases_org_001.nii.gz" in message
        assert isinstance(err.value, UserError) and isinstance(err.value, FileNotFoundError)


def test_covid19_ct_seg_unpaired_and_missing_lung_masks(tmp_path):
    _covid_tree(tmp_path)
    (tmp_path / "Lung_Mask" / "coronacases_001.nii.gz").unlink()
    with pytest.raises(MissingCTDataError, match="coronacases_001"):
        discover_covid19_ct_seg(tmp_path, lung_masks=True)
    (tmp_path / "Infection_Mask" / "radiopaedia_4_85506_1.nii.gz").unlink()
    with pytest.raises(DataFileError, match="radiopaedia_4_85506_1"):
        discover_covid19_ct_seg(tmp_path)


def test_msd_discovery_nnunet_and_msd_names(tmp_path):
    root = tmp_path / "Dataset006_Lung"
    for name in ("lung_001", "lung_003"):
        _save(root / "imagesTr" / f"{name}_0000.nii.gz", _volume())
        _save(root / "labelsTr" / f"{name}.nii.gz", np.zeros((6, 5, 3), np.uint8))
    (root / "imagesTr" / "._lung_001_0000.nii.gz").write_bytes(b"\x00")  # MSD tar junk
    (root / "dataset.json").write_text(json.dumps({"name": "Lung", "numTraining": 2}))
    cases = discover_msd(root)
    assert [(c.image.name, c.mask.name, c.patient, c.site) for c in cases] == [
        ("lung_001_0000.nii.gz", "lung_001.nii.gz", "lung_001", "Lung"),
        ("lung_003_0000.nii.gz", "lung_003.nii.gz", "lung_003", "Lung"),
    ]
    # MSD's own naming (no channel suffix) and no dataset.json: the folder names the site.
    msd = tmp_path / "Task03_Liver"
    _save(msd / "imagesTr" / "liver_0.nii.gz", _volume())
    _save(msd / "labelsTr" / "liver_0.nii.gz", np.zeros((6, 5, 3), np.uint8))
    assert discover_msd(msd) == [
        CaseSpec(
            msd / "imagesTr/liver_0.nii.gz", msd / "labelsTr/liver_0.nii.gz", "liver_0", msd.name
        )
    ]
    assert load_cases(cases).num_slices == 6


def test_msd_missing_and_multichannel(tmp_path):
    with pytest.raises(MissingCTDataError) as err:
        discover_msd(tmp_path)
    assert "http://medicaldecathlon.com/" in str(err.value) and "imagesTr" in str(err.value)
    _save(tmp_path / "imagesTr" / "brain_001_0000.nii.gz", _volume())
    _save(tmp_path / "imagesTr" / "brain_001_0001.nii.gz", _volume())
    _save(tmp_path / "labelsTr" / "brain_001.nii.gz", np.zeros((6, 5, 3), np.uint8))
    with pytest.raises(DataFileError, match="channel 0001"):
        discover_msd(tmp_path)


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_manifest_with_nifti_and_png_slices(tmp_path):
    _save(tmp_path / "vol" / "a.nii.gz", _volume((8, 8, 3)))
    _save(tmp_path / "vol" / "a_seg.nii.gz", np.ones((8, 8, 3), np.uint8))
    (tmp_path / "png").mkdir()
    grey = np.zeros((4, 6), np.uint8)
    grey[:, 3:] = 255
    Image.fromarray(grey).save(tmp_path / "png" / "b.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "png" / "c.jpg", quality=100)
    labels = np.zeros((4, 6), np.uint8)
    labels[0, :] = 2
    Image.fromarray(labels).save(tmp_path / "png" / "b_mask.png")
    Image.fromarray(labels).save(tmp_path / "png" / "c_mask.png")
    manifest = _write_manifest(
        tmp_path / "manifest.csv",
        [
            {"image": "vol/a.nii.gz", "mask": "vol/a_seg.nii.gz", "patient": "a", "site": "H1",
             "split": "train"},
            {"image": "png/b.png", "mask": "png/b_mask.png", "patient": "b", "site": "H2",
             "split": ""},
            {"image": "png/c.jpg", "mask": "png/c_mask.png", "patient": "c", "site": "H2",
             "split": "test"},
        ],
    )  # fmt: skip
    cases = read_manifest(manifest)
    assert [c.image for c in cases] == [tmp_path / "vol/a.nii.gz", tmp_path / "png/b.png",
                                        tmp_path / "png/c.jpg"]  # fmt: skip
    assert [c.split for c in cases] == ["train", None, "test"]
    slices = load_cases(cases, CTPreprocess(size=(4, 6)))
    assert slices.image.shape == (5, 4, 6, 1)
    assert slices.patients == ("a", "b", "c") and slices.sites == ("H1", "H2")
    np.testing.assert_array_equal(slices.slice_index, [0, 1, 2, NO_SLICE_INDEX, NO_SLICE_INDEX])
    png = slices.image[3, :, :, 0]
    np.testing.assert_allclose(png[:, :3], -1.0)
    np.testing.assert_allclose(png[:, 3:], 1.0)
    np.testing.assert_allclose(slices.image[4, :, :, 0], png, atol=0.05)  # the JPG copy
    np.testing.assert_array_equal(slices.mask[3], labels)
    split = predefined_split(slices, cases)
    assert list(split) == ["train", "test"]
    np.testing.assert_array_equal(split["train"], [0, 1, 2])
    np.testing.assert_array_equal(split["test"], [4])


def test_manifest_errors(tmp_path):
    with pytest.raises(MissingCTDataError, match="manifest not found"):
        read_manifest(tmp_path / "none.csv")
    bad = _write_manifest(tmp_path / "bad.csv", [{"image": "x.nii.gz", "mask": "y.nii.gz"}])
    with pytest.raises(DataFileError, match="patient"):
        read_manifest(bad)
    gone = _write_manifest(
        tmp_path / "gone.csv",
        [{"image": "x.nii.gz", "mask": "y.nii.gz", "patient": "p", "site": "s"}],
    )
    with pytest.raises(MissingCTDataError, match="x.nii.gz"):
        read_manifest(gone)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "m.jpg")
    Image.fromarray(np.full((4, 4), 9, np.uint8)).save(tmp_path / "i.png")
    with pytest.raises(DataFileError, match="PNG"):
        load_cases([CaseSpec(tmp_path / "i.png", tmp_path / "m.jpg", "p", "s")])
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(DataFileError) as err:
        load_cases([CaseSpec(tmp_path / "i.png", tmp_path / "small.png", "p", "s")])
    assert "i.png" in str(err.value) and "small.png" in str(err.value)


def test_different_sizes_need_a_target_size(tmp_path):
    for name, shape in (("a", (6, 5, 2)), ("b", (8, 8, 2))):
        _save(tmp_path / f"{name}.nii.gz", _volume(shape))
        _save(tmp_path / f"{name}_seg.nii.gz", np.zeros(shape, np.uint8))
    cases = [CaseSpec(tmp_path / f"{n}.nii.gz", tmp_path / f"{n}_seg.nii.gz", n, "s") for n in "ab"]
    with pytest.raises(ConfigError, match="CTPreprocess.size"):
        load_cases(cases)
    assert load_cases(cases, CTPreprocess(size=(8, 8))).image.shape == (4, 8, 8, 1)


# --------------------------------------------------------------------------- patients, sites


@pytest.fixture(scope="module")
def phantoms() -> SliceSet:
    return phantom_slices(num_sites=5, patients_per_site=4, num_slices=4, size=(16, 16))


def _patients(slices: SliceSet, idx: np.ndarray) -> set[int]:
    return set(slices.patient[idx].tolist())


def test_patient_split_has_no_leakage(phantoms):
    train, val, test = patient_split(phantoms, (0.7, 0.15, 0.15), seed=3)
    sets = [_patients(phantoms, i) for i in (train, val, test)]
    assert [len(s) for s in sets] == [14, 3, 3]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sorted(np.concatenate([train, val, test])) == list(range(phantoms.num_slices))
    again = patient_split(phantoms, (0.7, 0.15, 0.15), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test), strict=True))
    other = patient_split(phantoms, (0.7, 0.15, 0.15), seed=4)
    assert not np.array_equal(other[1], val)
    with pytest.raises(ConfigError, match="sum to 1"):
        patient_split(phantoms, (0.5, 0.2))


def test_site_patient_split_keeps_every_site_in_both(phantoms):
    train, heldout = site_patient_split(phantoms, (0.75, 0.25), seed=0)
    assert not _patients(phantoms, train) & _patients(phantoms, heldout)
    for s in range(len(phantoms.sites)):
        assert len(_patients(phantoms, train[phantoms.site[train] == s])) == 3
        assert len(_patients(phantoms, heldout[phantoms.site[heldout] == s])) == 1
    single = take(phantoms, np.flatnonzero(phantoms.patient == 0))
    with pytest.raises(ConfigError, match="site0"):
        site_patient_split(single, (0.8, 0.2))


def test_each_patient_in_one_client(phantoms):
    clients = site_indices(phantoms)
    assert len(clients) == 5 and sum(len(c) for c in clients) == phantoms.num_slices
    owners = [_patients(phantoms, c) for c in clients]
    assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1 :])
    moved = phantoms._replace(site=phantoms.site.copy())
    moved.site[0] = (moved.site[0] + 1) % 5  # one slice of a patient in another hospital
    with pytest.raises(DataFileError, match="site0_p0"):
        concat([moved])


def test_manifest_patient_in_two_sites_is_rejected(tmp_path):
    for name in ("a", "b"):
        _save(tmp_path / f"{name}.nii.gz", _volume())
        _save(tmp_path / f"{name}_seg.nii.gz", np.zeros((6, 5, 3), np.uint8))
    cases = [
        CaseSpec(tmp_path / "a.nii.gz", tmp_path / "a_seg.nii.gz", "p1", "H1", "train"),
        CaseSpec(tmp_path / "b.nii.gz", tmp_path / "b_seg.nii.gz", "p1", "H2", "train"),
    ]
    with pytest.raises(DataFileError, match="'p1'"):
        load_cases(cases)
    same_site = [c._replace(site="H1") for c in cases]
    slices = load_cases(same_site)
    assert slices.patients == ("p1",) and slices.num_slices == 6
    conflicting = [same_site[0], same_site[1]._replace(split="test")]
    with pytest.raises(DataFileError, match="splits"):
        predefined_split(slices, conflicting)


def test_partition_by_patient(phantoms):
    parted = partition_by_patient(phantoms, 3, seed=1)
    assert parted.sites == ("site0", "site1", "site2")
    per_site = [len(_patients(parted, c)) for c in site_indices(parted)]
    assert sorted(per_site) == [6, 7, 7]
    concat([parted])  # raises if a patient were split over sites
    assert not np.array_equal(partition_by_patient(phantoms, 3, seed=2).site, parted.site)
    with pytest.raises(ConfigError, match="num_sites"):
        partition_by_patient(phantoms, 21)


def test_take_and_concat_merge_names(phantoms):
    a = phantoms.select(np.flatnonzero(phantoms.site == 1))
    b = take(phantoms, phantoms.site == 0)
    joined = concat([a, b])
    assert joined.num_slices == a.num_slices + b.num_slices
    assert [joined.patients[p] for p in joined.patient] == (
        [a.patients[p] for p in a.patient] + [b.patients[p] for p in b.patient]
    )
    assert [joined.sites[s] for s in joined.site[:1]] == ["site1"]
    np.testing.assert_array_equal(joined.image[: a.num_slices], a.image)


# --------------------------------------------------------------------------- files end to end


@pytest.mark.parametrize("layout", ["manifest", "msd"])
def test_written_phantoms_load_like_in_memory_phantoms(tmp_path, layout):
    kwargs = {"num_sites": 2, "patients_per_site": 2, "num_slices": 8, "size": (16, 16), "seed": 5}
    roots = write_phantoms(tmp_path, layout, **kwargs)
    if layout == "manifest":
        cases = read_manifest(roots[0])
        assert all(c.lung is not None for c in cases)
    else:
        cases = [c for root in roots for c in discover_msd(root)]
    stored = nib.load(cases[0].image)
    assert nib.aff2axcodes(stored.affine) == ("L", "P", "S")
    loaded = load_cases(cases)
    expected = phantom_slices(**kwargs)
    for field in ("image", "mask", "patient", "site", "slice_index", "patients", "sites"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(expected, field), field)
    assert load_volume(cases[0].image).spacing == (5.0, 1.0, 1.0)


def test_cache_hit_and_miss(tmp_path, monkeypatch):
    (manifest,) = write_phantoms(tmp_path / "data", "manifest", 1, 2, num_slices=4, size=(8, 8))
    cases = read_manifest(manifest)
    config = CTPreprocess(size=(6, 6))
    first = load_cases(cases, config, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("ct-slices-*.npz"))) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("nibabel was called: the cache was missed")

    monkeypatch.setattr(nib, "load", no_reading)
    second = load_cases(cases, config, cache_dir=tmp_path / "cache")
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert second.mask.dtype == np.int32 and second.patients == first.patients
    with pytest.raises(AssertionError, match="cache was missed"):
        load_cases(
            cases, CTPreprocess(size=(6, 6), window_level=-500), cache_dir=tmp_path / "cache"
        )
    key = ct.cache_key(cases, config)
    os.utime(cases[0].image, ns=(0, 0))  # an edited input file
    assert ct.cache_key(cases, config) != key
    assert ct.cache_key(cases, CTPreprocess(size=(6, 6), lung_only=True)) != key


def test_unreadable_cache_is_rebuilt(tmp_path):
    (manifest,) = write_phantoms(tmp_path / "data", "manifest", 1, 1, num_slices=4, size=(8, 8))
    cases = read_manifest(manifest)
    path = ct.cache_path(tmp_path / "cache", cases, CTPreprocess())
    path.parent.mkdir()
    path.write_bytes(b"truncated")
    slices = load_cases(cases, cache_dir=tmp_path / "cache")
    assert slices.num_slices == 4 and path.stat().st_size > 1000


# --------------------------------------------------------------------------- the real CT pair


@pytest.fixture(scope="module")
def shared_dir() -> Path:
    found = _shared_data_dir()
    if found is None:
        pytest.skip("TotalSegmentator example not found ($JAXFL_DATA_DIR or ../shared/data)")
    return found


def test_totalseg_example_geometry(shared_dir):
    image = load_volume(shared_dir / ct.TOTALSEG_EXAMPLE_IMAGE)
    seg = load_volume(shared_dir / ct.TOTALSEG_EXAMPLE_SEG)
    assert image.data.shape == (30, 101, 122) and seg.data.shape == (30, 101, 122)
    assert image.spacing == (3.0, 3.0, 3.0)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert (image.data.min(), image.data.max()) == (-1100.0, 1207.0)
    ct.check_same_grid(image, seg, Path("ct"), Path("seg"))

    def centroid(label: int) -> np.ndarray:
        return np.argwhere(seg.data == label).mean(axis=0)  # (z, row, column)

    liver, spleen, stomach, kidney = centroid(5), centroid(1), centroid(6), centroid(2)
    assert liver[2] < 61 < spleen[2]  # patient right on the image's left
    assert stomach[1] < kidney[1]  # anterior at the top
    lung_slices = np.flatnonzero(np.isin(seg.data, ct.TOTALSEG_LUNG_LABELS).any(axis=(1, 2)))
    np.testing.assert_array_equal(lung_slices, np.arange(19, 30))  # superior = high index


def test_totalseg_example_liver_slices(shared_dir, tmp_path):
    slices = load_totalseg_example(shared_dir, cache_dir=tmp_path)
    assert slices.image.shape == (30, 101, 122, 1) and slices.image.dtype == np.float32
    assert slices.image.min() >= -1.0 and slices.image.max() <= 1.0
    assert set(np.unique(slices.mask)) == {0, 1}
    assert slices.mask.sum() == 38634  # voxels of label 5 in the segmentation
    assert (slices.mask.sum(axis=(1, 2)) > 0).all()
    lungs = load_totalseg_example(
        shared_dir,
        CTPreprocess(label_map={5: 1}, lung_only=True, lung_labels=ct.TOTALSEG_LUNG_LABELS),
    )
    np.testing.assert_array_equal(lungs.slice_index, np.arange(19, 30))
    resized = load_totalseg_example(shared_dir, CTPreprocess(size=(64, 64), label_map={5: 1}))
    assert resized.mask.shape == (30, 64, 64) and set(np.unique(resized.mask)) == {0, 1}


def test_totalseg_example_missing(tmp_path):
    with pytest.raises(MissingCTDataError, match="TotalSegmentator"):
        load_totalseg_example(tmp_path)
