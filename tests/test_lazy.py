"""Lazy per-client rows: the same values as eager stacking, read only when used."""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_radchest
from test_volumes_train import LABELS, _radchest_config

from jaxfl.data import AcquisitionShift, apply_to_clients, stack_clients
from jaxfl.data.federated import materialize
from jaxfl.data.heterogeneity import HELDOUT_STREAM, TRAIN_STREAM
from jaxfl.data.lazy import LazyRows, is_lazy
from jaxfl.train import load_federated_data

SOURCE = np.arange(7 * 3 * 2, dtype=np.float32).reshape(7, 3, 2)
TABLE = np.array([[4, 0, -1], [-1, -1, -1], [6, 5, 2]])


def _eager(table: np.ndarray) -> np.ndarray:
    out = np.zeros((*table.shape, *SOURCE.shape[1:]), SOURCE.dtype)
    out[table >= 0] = SOURCE[table[table >= 0]]
    return out


@pytest.mark.parametrize(
    "key",
    [0, 2, -1, slice(None), slice(1, 3), np.array([2, 0]), (2, 1), (0, slice(0, 2), 1), (2, ...)],
)
def test_lazy_rows_index_like_the_gathered_array(key):
    lazy, ref = LazyRows(SOURCE, TABLE), _eager(TABLE)
    assert lazy.shape == ref.shape and lazy.dtype == ref.dtype and len(lazy) == len(ref)
    np.testing.assert_array_equal(lazy[key], ref[key])


def test_lazy_rows_convert_to_numpy_and_jax_arrays():
    ref = _eager(TABLE)
    lazy = LazyRows(SOURCE, TABLE)
    np.testing.assert_array_equal(np.asarray(lazy), ref)
    np.testing.assert_array_equal(np.asarray(jnp.asarray(lazy)), ref)
    np.testing.assert_array_equal(lazy.take_clients([2, 2, 0]), ref[[2, 2, 0]])
    with pytest.raises(ValueError, match="source with 7"):
        LazyRows(SOURCE, np.array([[7]]))


def test_client_transforms_see_only_each_clients_real_rows():
    seen = {}

    def double(c, x):
        seen[c] = x.shape[0]
        return 2 * x

    lazy = LazyRows(SOURCE, TABLE).map_clients(double)
    np.testing.assert_array_equal(np.asarray(lazy), 2 * _eager(TABLE))
    assert seen == {0: 2, 2: 3}  # client 1 has no rows; padding never reaches the transform
    np.testing.assert_array_equal(lazy[0, 1], 2 * SOURCE[0])


def test_lazy_stacking_equals_eager_and_reads_through_a_lazy_split():
    rng = np.random.default_rng(0)
    examples = {"image": rng.normal(size=(20, 4, 4, 1)), "label": rng.integers(0, 3, 20)}
    clients = [np.array([3, 1, 4]), np.array([], int), np.arange(5, 12)]
    eager = stack_clients(examples, clients, pad_multiple=4)
    lazy = stack_clients(examples, clients, pad_multiple=4, lazy=True)
    assert all(is_lazy(v) for v in lazy.examples.values())
    np.testing.assert_array_equal(lazy.mask, eager.mask)
    np.testing.assert_array_equal(lazy.counts, eager.counts)
    for name, value in materialize(lazy).examples.items():
        np.testing.assert_array_equal(value, eager.examples[name])
    # A split that is itself lazy rows of a bigger source (a volume cache's training volumes).
    picked = np.arange(20)[::-1].copy()
    split = {"image": LazyRows(examples["image"], picked), "label": examples["label"][picked]}
    through = stack_clients(split, clients, lazy=True)
    assert through.examples["image"].source is examples["image"]
    np.testing.assert_array_equal(
        np.asarray(through.examples["image"]),
        stack_clients({k: np.asarray(v) for k, v in split.items()}, clients).examples["image"],
    )


def test_lazy_acquisition_shifts_equal_eager_ones():
    rng = np.random.default_rng(1)
    examples = {"image": rng.uniform(-1, 1, (18, 10, 6, 6, 1)).astype(np.float32)}
    clients = [np.arange(0, 6), np.arange(6, 12), np.arange(12, 18)]
    shifts = [
        AcquisitionShift(),
        AcquisitionShift(slice_thickness=5),
        AcquisitionShift(noise_std=0.2),
    ]
    for stream in (TRAIN_STREAM, HELDOUT_STREAM):
        eager = apply_to_clients(stack_clients(examples, clients), shifts, seed=3, stream=stream)
        lazy = apply_to_clients(
            stack_clients(examples, clients, lazy=True), shifts, seed=3, stream=stream
        )
        np.testing.assert_array_equal(np.asarray(lazy.examples["image"]), eager.examples["image"])
    # Negative control: the shifts changed clients 1 and 2, not client 0.
    raw = stack_clients(examples, clients).examples["image"]
    np.testing.assert_array_equal(eager.examples["image"][0], raw[0])
    assert not np.allclose(eager.examples["image"][1:], raw[1:])


def test_lazy_shift_that_cannot_apply_fails_when_built():
    examples = {"image": np.zeros((4, 8, 8, 1), np.float32)}  # 2D: no slice axis to average
    lazy = stack_clients(examples, [np.arange(2), np.arange(2, 4)], lazy=True)
    with pytest.raises(ValueError, match="client 1"):
        apply_to_clients(lazy, [AcquisitionShift(), AcquisitionShift(slice_thickness=5)], seed=0)


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_reading_a_memory_map_does_not_keep_its_pages_resident(tmp_path):
    path = tmp_path / "image.npy"
    image = np.lib.format.open_memmap(path, "w+", np.float32, (64, 256, 1024))  # 64 MiB
    image[:] = 1.0
    image.flush()
    del image
    source = np.load(path, mmap_mode="r")
    lazy = LazyRows(source, np.arange(64).reshape(8, 8))
    before = _rss_file_kib()
    for c in range(8):
        assert lazy.take_clients([c]).sum() == 8 * 256 * 1024
    assert _rss_file_kib() - before < 16 * 1024
    # Negative control: the same reads straight from the map leave the pages resident.
    for c in range(8):
        np.take(source, np.arange(8 * c, 8 * c + 8), axis=0).sum()
    assert _rss_file_kib() - before > 48 * 1024


@pytest.fixture(scope="module")
def radchest_dir(tmp_path_factory):
    return write_radchest(tmp_path_factory.mktemp("radchest_lazy"), LABELS, shape=(10, 16, 16))


def test_streamed_volumes_stay_lazy_and_equal_device_resident_ones(radchest_dir):
    stream = load_federated_data(_radchest_config(radchest_dir, placement="stream"))
    device = load_federated_data(_radchest_config(radchest_dir, placement="device"))
    assert is_lazy(stream.train.examples["image"]) and is_lazy(stream.heldout.examples["image"])
    assert not is_lazy(device.train.examples["image"])
    for split in ("train", "heldout"):
        for name, value in getattr(device, split).examples.items():
            np.testing.assert_array_equal(np.asarray(getattr(stream, split).examples[name]), value)


@pytest.mark.parametrize("key", [slice(None), slice(0, 4), slice(2, 7), slice(7, 9), slice(5, 5)])
def test_flat_clients_read_the_slices_of_the_flattened_clients(key):
    lazy = LazyRows(SOURCE, TABLE).map_clients(lambda c, x: x + 100 * c)
    flat = np.asarray(lazy).reshape(-1, *SOURCE.shape[1:])
    view = lazy.flat_clients()
    assert len(view) == len(flat)
    np.testing.assert_array_equal(view[key], flat[key])
    with pytest.raises(TypeError, match="contiguous"):
        view[::2]


def test_held_out_evaluation_of_lazy_clients_equals_eager(tiny_model, tiny_params):
    from jaxfl.tasks import CLASSIFICATION, evaluate_clients, make_stats_fn

    rng = np.random.default_rng(2)
    examples = {
        "image": rng.normal(size=(30, 4, 4, 1)).astype(np.float32),
        "label": rng.integers(0, 3, 30).astype(np.int32),
    }
    clients = [np.arange(0, 7), np.arange(7, 9), np.arange(9, 30)]
    stats_fn = make_stats_fn(CLASSIFICATION, tiny_model.apply)
    eager = evaluate_clients(
        CLASSIFICATION, stats_fn, tiny_params, stack_clients(examples, clients), batch_size=8
    )
    lazy = evaluate_clients(
        CLASSIFICATION,
        stats_fn,
        tiny_params,
        stack_clients(examples, clients, lazy=True),
        batch_size=8,
    )
    assert eager.keys() == lazy.keys()
    for name in eager:
        np.testing.assert_array_equal(lazy[name], eager[name])
