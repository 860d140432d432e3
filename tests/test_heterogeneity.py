"""Tests for jaxfl.data.heterogeneity: simulated per-client scanner shifts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxfl.data.federated import stack_clients
from jaxfl.data.heterogeneity import (
    HELDOUT_STREAM,
    TRAIN_STREAM,
    AcquisitionShift,
    apply_shift,
    apply_to_clients,
    average_slices,
    resample,
    sample_shifts,
    scanner_presets,
    shifts_from_config,
    slice_thickness,
)

# One non-identity setting per transform; each is exercised alone and combined.
SINGLE_SHIFTS = {
    "scale": AcquisitionShift(scale=1.3),
    "offset": AcquisitionShift(offset=0.1),
    "gamma": AcquisitionShift(gamma=0.7),
    "blur": AcquisitionShift(blur_sigma=1.0),
    "noise": AcquisitionShift(noise_std=0.05),
    "downsample": AcquisitionShift(downsample=2),
    "float_downsample": AcquisitionShift(downsample=1.5),
}
COMBINED = AcquisitionShift(
    scale=0.8, offset=-0.1, gamma=1.5, blur_sigma=0.8, noise_std=0.05, downsample=2
)


def _images(shape=(5, 12, 12, 3), seed=0) -> np.ndarray:
    """Random float32 images in [-1, 1] like jaxfl's normalized data."""
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _volume_with_slice_values(depth: int, n: int = 2) -> np.ndarray:
    """``[n, depth, 3, 3, 1]`` volumes whose slice ``d`` is constant ``d``."""
    values = np.arange(depth, dtype=np.float32).reshape(1, depth, 1, 1, 1)
    return np.broadcast_to(values, (n, depth, 3, 3, 1)).copy()


# --------------------------------------------------------------------------- single transforms


@pytest.mark.parametrize("name", [*SINGLE_SHIFTS, "combined"])
@pytest.mark.parametrize("shape", [(5, 12, 12, 3), (3, 10, 8, 8, 1)])
def test_shift_keeps_shape_dtype_and_is_deterministic(name, shape):
    shift = COMBINED if name == "combined" else SINGLE_SHIFTS[name]
    x = _images(shape)
    out = apply_shift(x, shift, seed=3)
    assert out.shape == x.shape and out.dtype == np.float32
    assert not np.array_equal(out, x), "a non-identity shift must change the images"
    np.testing.assert_array_equal(out, apply_shift(x, shift, seed=3))


def test_identity_shift_returns_input_exactly():
    for shape in [(5, 12, 12, 3), (3, 10, 8, 8, 1)]:
        x = _images(shape)
        out = apply_shift(x, AcquisitionShift(slice_mode="repeat"), seed=0)
        np.testing.assert_array_equal(out, x)
        assert out is not x


def test_noise_differs_by_seed_stream_and_client_only():
    x = _images()
    shift = AcquisitionShift(noise_std=0.1)
    base = apply_shift(x, shift, seed=0)
    for kwargs in [{"seed": 1}, {"seed": 0, "stream": 1}, {"seed": 0, "client_id": 1}]:
        assert not np.allclose(apply_shift(x, shift, **kwargs), base)
    np.testing.assert_allclose((base - x).std(), 0.1, rtol=0.1)


def test_intensity_is_affine():
    x = _images()
    out = apply_shift(x, AcquisitionShift(scale=2.0, offset=0.25), seed=0)
    np.testing.assert_allclose(out, 2.0 * x + 0.25, rtol=1e-6)


def test_gamma_acts_on_value_range_and_keeps_its_ends():
    x = np.array([-1.0, 0.0, 1.0, 1.5], dtype=np.float32).reshape(1, 4, 1, 1)
    out = apply_shift(x, AcquisitionShift(gamma=2.0), seed=0).ravel()
    # u = (x + 1) / 2 = [0, 0.5, 1, 1 (clipped)] -> u**2 = [0, 0.25, 1, 1] -> 2u - 1.
    np.testing.assert_allclose(out, [-1.0, -0.5, 1.0, 1.0], atol=1e-6)
    unit = apply_shift(x, AcquisitionShift(gamma=2.0), seed=0, value_range=(0.0, 1.0)).ravel()
    np.testing.assert_allclose(unit, [0.0, 0.0, 1.0, 1.0], atol=1e-6)


def test_blur_mixes_neither_channels_nor_examples():
    x = np.zeros((3, 9, 9, 3), dtype=np.float32)
    x[1, 4, 4, 0] = 1.0
    out = apply_shift(x, AcquisitionShift(blur_sigma=1.0), seed=0)
    np.testing.assert_array_equal(out[:, ..., 1:], 0.0)
    np.testing.assert_array_equal(out[[0, 2]], 0.0)
    assert 0 < out[1, 4, 4, 0] < 1 and out[1, 3, 4, 0] > 0, "the impulse must spread"
    np.testing.assert_allclose(out.sum(), 1.0, rtol=1e-4)


def test_blur_keeps_a_constant_image():
    x = np.full((2, 10, 10, 1), 0.3, dtype=np.float32)
    out = apply_shift(x, AcquisitionShift(blur_sigma=1.5), seed=0)
    np.testing.assert_allclose(out, 0.3, atol=1e-6)


def test_blur_runs_over_depth_for_volumes():
    x = np.zeros((1, 7, 5, 5, 1), dtype=np.float32)
    x[0, 3] = 1.0
    out = apply_shift(x, AcquisitionShift(blur_sigma=1.0), seed=0)
    assert out[0, 2].min() > 0 and out[0, 3].max() < 1


@pytest.mark.parametrize("factor", [2, 3, 1.5, 4])
def test_resample_keeps_a_constant_image(factor):
    x = np.full((2, 12, 10, 2), -0.4, dtype=np.float32)
    out = apply_shift(x, AcquisitionShift(downsample=factor), seed=0)
    np.testing.assert_allclose(out, -0.4, atol=1e-6)


def test_resample_flattens_a_checkerboard_at_factor_two():
    board = (np.indices((8, 8)).sum(0) % 2).astype(np.float32)
    x = board[None, :, :, None]
    out = apply_shift(x, AcquisitionShift(downsample=2), seed=0)
    np.testing.assert_allclose(out, 0.5, atol=1e-6)


def test_resample_blocks_of_a_ramp_at_factor_two():
    # Area-average of [0 1 | 2 3 | 4 5] is [0.5, 2.5, 4.5]; linear back to 6 samples with
    # edge clamping: [0.5, 1.0, 2.0, 3.0, 4.0, 4.5].
    x = np.arange(6, dtype=np.float32)[None, :, None]
    np.testing.assert_allclose(
        resample(x, 2, axes=(1,)).ravel(), [0.5, 1.0, 2.0, 3.0, 4.0, 4.5], atol=1e-6
    )


def test_resample_leaves_depth_of_volumes_alone():
    x = _volume_with_slice_values(6)
    out = apply_shift(x, AcquisitionShift(downsample=3), seed=0)
    np.testing.assert_allclose(out, x, atol=1e-6)


# --------------------------------------------------------------------------- slice thickness


def test_slice_average_pads_with_zeros_like_pppml_hmi():
    x = _volume_with_slice_values(7)
    out = slice_thickness(x, 3, "pad")
    np.testing.assert_allclose(out[0, :, 0, 0, 0], [1, 4, 6, 0, 0, 0, 0])
    np.testing.assert_array_equal(out[1], out[0])
    np.testing.assert_array_equal(average_slices(x, 3)[0, :, 1, 2, 0], [1, 4, 6])


@pytest.mark.parametrize("thickness", [1, 5, 10, 7])
def test_slice_thickness_matches_a_numpy_loop_on_70_slice_volumes(thickness):
    # PPPML-HMI: average groups of t adjacent slices, zero-pad back to 70 (t = 7: no remainder
    # left out; 70 = 10 * 7). Reference: a plain loop over groups.
    x = np.random.default_rng(thickness).normal(size=(2, 70, 3, 4, 1)).astype(np.float32)
    ref = np.zeros_like(x)
    for g, start in enumerate(range(0, 70, thickness)):
        ref[:, g] = x[:, start : start + thickness].mean(axis=1)
    np.testing.assert_allclose(slice_thickness(x, thickness, "pad"), ref, rtol=1e-5, atol=1e-6)


def test_slice_average_repeat_mode():
    x = _volume_with_slice_values(7)
    out = slice_thickness(x, 3, "repeat")
    np.testing.assert_allclose(out[0, :, 0, 0, 0], [1, 1, 1, 4, 4, 4, 6])


def test_slice_thickness_one_is_identity_and_larger_than_depth_averages_all():
    x = _volume_with_slice_values(5)
    np.testing.assert_array_equal(slice_thickness(x, 1, "pad"), x)
    np.testing.assert_allclose(slice_thickness(x, 10, "pad")[0, :, 0, 0, 0], [2, 0, 0, 0, 0])


def test_pad_slices_stay_zero_under_other_steps():
    x = _volume_with_slice_values(10)
    shift = dataclasses.replace(COMBINED, slice_thickness=5)
    out = apply_shift(x, shift, seed=0)
    np.testing.assert_array_equal(out[:, 2:], 0.0)
    assert np.all(out[:, :2] != 0)


def test_pppml_hmi_shift_via_apply_shift():
    x = _volume_with_slice_values(70)
    out = apply_shift(x, AcquisitionShift(slice_thickness=10), seed=0)
    np.testing.assert_allclose(out[0, :7, 0, 0, 0], np.arange(7) * 10 + 4.5)
    np.testing.assert_array_equal(out[:, 7:], 0.0)


def test_slice_thickness_on_2d_images_raises():
    with pytest.raises(ValueError, match="slice_thickness"):
        apply_shift(_images(), AcquisitionShift(slice_thickness=5), seed=0)


# --------------------------------------------------------------------------- apply_to_clients


def _client_arrays(shape=(6, 6, 1), counts=(4, 0, 2)):
    """ClientArrays with the given per-client counts over random [-1, 1] images."""
    n = sum(counts)
    images = _images((n, *shape), seed=1)
    labels = np.arange(n) % 3
    bounds = np.cumsum((0, *counts))
    idx = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return stack_clients({"image": images, "label": labels}, idx)


def test_apply_to_clients_shifts_real_rows_only():
    arrays = _client_arrays()
    shifts = [COMBINED, AcquisitionShift(noise_std=0.2), AcquisitionShift(offset=0.3)]
    out = apply_to_clients(arrays, shifts, seed=0)
    np.testing.assert_array_equal(out.examples["label"], arrays.examples["label"])
    for field in ("mask", "counts"):
        np.testing.assert_array_equal(getattr(out, field), getattr(arrays, field))
    assert (
        out.examples["image"].shape == arrays.examples["image"].shape
        and out.examples["image"].dtype == np.float32
    )
    np.testing.assert_array_equal(out.examples["image"][0, 4:], 0.0)
    np.testing.assert_array_equal(out.examples["image"][1], 0.0)
    np.testing.assert_array_equal(out.examples["image"][2, 2:], 0.0)
    np.testing.assert_allclose(
        out.examples["image"][2, :2], arrays.examples["image"][2, :2] + 0.3, atol=1e-6
    )
    expected = apply_shift(arrays.examples["image"][0, :4], COMBINED, seed=0, client_id=0)
    np.testing.assert_array_equal(out.examples["image"][0, :4], expected)


def test_apply_to_clients_identity_and_streams():
    arrays = _client_arrays()
    same = apply_to_clients(arrays, [AcquisitionShift()] * 3, seed=0)
    np.testing.assert_array_equal(same.examples["image"], arrays.examples["image"])
    noisy = [AcquisitionShift(noise_std=0.1)] * 3
    train = apply_to_clients(arrays, noisy, seed=0, stream=TRAIN_STREAM)
    heldout = apply_to_clients(arrays, noisy, seed=0, stream=HELDOUT_STREAM)
    np.testing.assert_array_equal(
        train.examples["image"], apply_to_clients(arrays, noisy, seed=0).examples["image"]
    )
    assert not np.allclose(train.examples["image"][0, :4], heldout.examples["image"][0, :4])
    # Same shift on identical images of two clients: the noise must differ between clients.
    twins = _client_arrays(counts=(2, 2))
    first = twins.examples["image"][0]
    twins = twins._replace(examples={**twins.examples, "image": np.stack([first, first])})
    both = apply_to_clients(twins, noisy[:2], seed=0)
    assert not np.allclose(both.examples["image"][0], both.examples["image"][1])


def test_apply_to_clients_rejects_wrong_number_of_shifts():
    with pytest.raises(ValueError, match="2 shifts for 3 clients"):
        apply_to_clients(_client_arrays(), [AcquisitionShift()] * 2, seed=0)


def test_apply_to_clients_names_the_client_on_2d_thickness():
    shifts = [AcquisitionShift(), AcquisitionShift(), AcquisitionShift(slice_thickness=5)]
    with pytest.raises(ValueError, match="client 2: slice_thickness"):
        apply_to_clients(_client_arrays(), shifts, seed=0)


def test_apply_to_clients_volumes_with_presets():
    arrays = _client_arrays(shape=(10, 4, 4, 1), counts=(2, 3, 1))
    out = apply_to_clients(arrays, scanner_presets(3), seed=0)
    np.testing.assert_array_equal(out.examples["image"][0], arrays.examples["image"][0])
    np.testing.assert_allclose(
        out.examples["image"][1, :3, :2], average_slices(arrays.examples["image"][1, :3], 5)
    )
    np.testing.assert_array_equal(out.examples["image"][1, :, 2:], 0.0)
    np.testing.assert_allclose(
        out.examples["image"][2, :1, 0], arrays.examples["image"][2, :1].mean(axis=1), atol=1e-6
    )
    np.testing.assert_array_equal(out.examples["image"][2, :, 1:], 0.0)


# --------------------------------------------------------------------------- sampling


def test_sample_shifts_strength_zero_is_identity():
    assert all(s.is_identity for s in sample_shifts(5, seed=3, strength=0.0, is_3d=True))
    assert all(s == AcquisitionShift() for s in sample_shifts(4, seed=1, strength={}))


def test_sample_shifts_is_deterministic_and_varies_by_client_and_seed():
    a = sample_shifts(6, seed=0, strength=0.7, is_3d=True)
    assert a == sample_shifts(6, seed=0, strength=0.7, is_3d=True)
    assert a != sample_shifts(6, seed=1, strength=0.7, is_3d=True)
    assert len(set(a)) == 6
    assert a[:3] == sample_shifts(3, seed=0, strength=0.7, is_3d=True)
    assert not any(s.is_identity for s in a)


def test_sample_shifts_respects_documented_ranges():
    s = 0.6
    shifts = sample_shifts(200, seed=0, strength=s, is_3d=True)
    get = lambda f: np.array([getattr(x, f) for x in shifts])
    assert np.all(np.abs(get("scale") - 1) <= 0.5 * s)
    assert np.all(np.abs(get("offset")) <= 0.2 * s)
    assert np.all(np.abs(np.log(get("gamma"))) <= s)
    assert np.all((get("blur_sigma") >= 0) & (get("blur_sigma") <= 1.5 * s))
    assert np.all((get("noise_std") >= 0) & (get("noise_std") <= 0.1 * s))
    assert set(get("downsample")) == {1.0, 2.0}
    assert set(get("slice_thickness")) == {1, 5}
    full = sample_shifts(200, seed=0, strength=1.0, is_3d=True)
    assert {x.downsample for x in full} == {1.0, 2.0, 3.0, 4.0}
    assert {x.slice_thickness for x in full} == {1, 5, 10}


def test_sample_shifts_2d_keeps_thickness_one_and_per_field_strength():
    flat = sample_shifts(20, seed=0, strength=1.0)
    assert all(x.slice_thickness == 1 for x in flat)
    only_noise = sample_shifts(10, seed=0, strength={"noise_std": 1.0})
    assert all(x == AcquisitionShift(noise_std=x.noise_std) for x in only_noise)
    assert len({x.noise_std for x in only_noise}) == 10


def test_scanner_presets_cycle_thicknesses():
    shifts = scanner_presets(5)
    assert [s.slice_thickness for s in shifts] == [1, 5, 10, 1, 5]
    assert all(s.slice_mode == "pad" for s in shifts)
    assert shifts[0].is_identity
    assert scanner_presets(2, (2, 3), slice_mode="repeat")[1].slice_mode == "repeat"


# --------------------------------------------------------------------------- config + validation


def test_shifts_from_config_forms():
    assert shifts_from_config(None, 3, is_3d=False) == [AcquisitionShift()] * 3
    explicit = shifts_from_config([{}, {"blur_sigma": 1}, {"gamma": 0.5}], 3, is_3d=False)
    assert explicit[1] == AcquisitionShift(blur_sigma=1.0) and explicit[2].gamma == 0.5
    sampled = shifts_from_config({"strength": 0.5, "seed": 7}, 4, is_3d=True)
    assert sampled == sample_shifts(4, 7, 0.5, is_3d=True)
    assert shifts_from_config({"strength": 0.5}, 4, is_3d=True, seed=7) == sampled
    assert shifts_from_config({"preset": "pppml_hmi"}, 3, is_3d=True) == scanner_presets(3)
    thick = shifts_from_config([{"slice_thickness": 5.0}], 1, is_3d=True)[0].slice_thickness
    assert thick == 5 and isinstance(thick, int)


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"sigma": 1.0}, "sigma"),
        ({"blur_sigma": -1.0}, "blur_sigma"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -2.0}, "gamma"),
        ({"scale": 0.0}, "scale"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"downsample": 0.5}, "downsample"),
        ({"slice_thickness": 2.5}, "slice_thickness"),
        ({"slice_thickness": 0}, "slice_thickness"),
        ({"slice_mode": "crop"}, "slice_mode"),
        ({"offset": float("nan")}, "offset"),
        ({"scale": "big"}, "scale"),
    ],
)
def test_validation_names_field_and_client(entry, field):
    spec = [{}, entry]
    with pytest.raises(ValueError, match=rf"client 1: .*{field}"):
        shifts_from_config(spec, 2, is_3d=True)


def test_validation_rejects_thickness_on_2d():
    with pytest.raises(ValueError, match=r"client 0: slice_thickness=5 .* 2D"):
        shifts_from_config([{"slice_thickness": 5}], 1, is_3d=False)
    with pytest.raises(ValueError, match="pppml_hmi"):
        shifts_from_config({"preset": "pppml_hmi"}, 3, is_3d=False)
    with pytest.raises(ValueError, match="slice_thickness"):
        shifts_from_config({"strength": {"slice_thickness": 1.0}}, 3, is_3d=False)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([{}, {}], "2 per-client settings for 3 clients"),
        ({"strength": 1.5}, "in \\[0, 1\\]"),
        ({"strength": {"blur": 0.5}}, "unknown fields \\['blur'\\]"),
        ({"strenght": 0.5}, "unknown keys \\['strenght'\\]"),
        ({"strength": 0.5, "preset": "pppml_hmi"}, "exactly one of"),
        ({"preset": "siemens"}, "preset 'siemens'"),
        ("strong", "got str"),
        ([{}, {}, 3], "client 2: expected a dict"),
    ],
)
def test_config_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        shifts_from_config(spec, 3, is_3d=True)


def test_shifts_from_config_accepts_config_dicts():
    ml_collections = pytest.importorskip("ml_collections")
    spec = ml_collections.ConfigDict({"strength": 0.3, "seed": 2})
    assert shifts_from_config(spec, 2, is_3d=False) == sample_shifts(2, 2, 0.3)


# --------------------------------------------------------------------------- label alignment


@pytest.mark.parametrize("name", [*SINGLE_SHIFTS, "combined"])
def test_2d_masks_stay_aligned_under_in_plane_transforms(name):
    # A lesion blob: the shifted image must still be brightest where the mask says lesion,
    # i.e. the image/mask overlap is best at zero offset (a drifted mask would peak elsewhere).
    shift = COMBINED if name == "combined" else SINGLE_SHIFTS[name]
    yy, xx = np.mgrid[:16, :16]
    mask = (((yy - 6) ** 2 + (xx - 9) ** 2) <= 9).astype(np.int32)
    image = (mask * 1.6 - 0.8).astype(np.float32)[None, :, :, None]
    arrays = stack_clients({"image": image, "mask": mask[None]}, [np.arange(1)])
    out = apply_to_clients(arrays, [shift], seed=0, label_keys=("mask",))
    np.testing.assert_array_equal(out.examples["mask"], arrays.examples["mask"])
    shifted = out.examples["image"][0, 0, ..., 0]
    sign = np.sign(np.corrcoef(shifted.ravel(), image.ravel())[0, 1])  # gamma keeps the order
    scores = {
        (dy, dx): sign * np.sum(shifted * np.roll(mask, (dy, dx), axis=(0, 1)))
        for dy in range(-2, 3)
        for dx in range(-2, 3)
    }
    assert max(scores, key=scores.get) == (0, 0), name


@pytest.mark.parametrize("thickness, mode", [(3, "pad"), (4, "pad"), (5, "repeat"), (2, "repeat")])
def test_3d_masks_follow_slice_thickness(thickness, mode):
    # Slice z holds the value z everywhere and the label z: after averaging, every thick slice
    # must carry the label of the slice at its centre, i.e. within half a group of its value.
    depth = 12
    z = np.arange(depth, dtype=np.float32)
    image = np.broadcast_to(z[None, :, None, None, None], (1, depth, 4, 4, 1)).copy()
    mask = np.broadcast_to(np.arange(depth, dtype=np.int32)[None, :, None, None], (1, depth, 4, 4))
    shift = AcquisitionShift(slice_thickness=thickness, slice_mode=mode)
    arrays = stack_clients({"image": image / depth, "mask": mask.copy()}, [np.arange(1)])
    out = apply_to_clients(arrays, [shift], seed=0, label_keys=("mask",), ignore_label=-1)
    values = out.examples["image"][0, 0, :, 0, 0, 0] * depth
    labels = out.examples["mask"][0, 0, :, 0, 0]
    groups = -(-depth // thickness)
    real = np.arange(depth) < groups if mode == "pad" else np.ones(depth, bool)
    assert np.all(np.abs(labels[real] - values[real]) <= (thickness - 1) / 2 + 1e-5)
    if mode == "pad":
        # The padded slices have no anatomy: image exactly 0, label ignored.
        np.testing.assert_array_equal(values[~real], 0.0)
        np.testing.assert_array_equal(labels[~real], -1)
        # Without label_keys the mask would silently stay put and drift from the image.
        stale = apply_to_clients(arrays, [shift], seed=0).examples["mask"][0, 0, :, 0, 0]
        assert np.any(np.abs(stale[real] - values[real]) > (thickness - 1) / 2 + 1e-5)


def test_label_keys_must_name_features():
    arrays = stack_clients({"image": _images()}, [np.arange(5)])
    with pytest.raises(ValueError, match="label_keys"):
        apply_to_clients(arrays, [AcquisitionShift(noise_std=0.1)], seed=0, label_keys=("mask",))
