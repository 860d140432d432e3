"""Tests for jaxfl.data: partitioners, synthetic data, MedMNIST loading, federated stacking."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from jaxfl.data import (
    DATA_DIR_ENV,
    PARTITIONERS,
    MissingDataError,
    bloodmnist_paper,
    build_federated,
    dirichlet,
    iid,
    load_medmnist,
    make_synthetic_arrays,
    medmnist_filename,
    partition,
    pathological,
    quantity_skew,
    resolve_data_dir,
    split_heldout,
    stack_clients,
    synthetic_dataset,
    write_npz,
)
from jaxfl.types import ClientArrays, Dataset, FederatedData

# Keyword arguments that make every registered partitioner callable with (labels, K, seed).
PARTITION_KWARGS = {
    "iid": {},
    "dirichlet": {"alpha": 0.5},
    "quantity_skew": {"sigma": 1.0},
    "pathological": {"classes_per_client": 2},
    "bloodmnist_paper": {},
}


def _labels(n: int = 600, num_classes: int = 6, seed: int = 0) -> np.ndarray:
    """Random integer labels [n] with every class present."""
    return np.random.default_rng(seed).permutation(np.arange(n) % num_classes)


def _shared_data_dir() -> Path:
    """Directory with the real MedMNIST files (env JAXFL_SHARED_DATA overrides)."""
    env = os.environ.get("JAXFL_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------- partitioners


def test_registry_matches_kwargs_table():
    assert set(PARTITIONERS) == set(PARTITION_KWARGS)


@pytest.mark.parametrize("name", sorted(PARTITION_KWARGS))
def test_partition_disjoint_complete_sorted(name):
    y = _labels()
    parts = partition(name, y, 10, seed=3, **PARTITION_KWARGS[name])
    assert len(parts) == 10
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0), "indices must be sorted and unique"
    allidx = np.concatenate(parts)
    assert allidx.size == y.size
    np.testing.assert_array_equal(np.sort(allidx), np.arange(y.size))


@pytest.mark.parametrize("name", sorted(PARTITION_KWARGS))
def test_partition_deterministic_and_seed_dependent(name):
    y = _labels()
    kw = PARTITION_KWARGS[name]
    a = partition(name, y, 10, seed=1, **kw)
    b = partition(name, y, 10, seed=1, **kw)
    c = partition(name, y, 10, seed=2, **kw)
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))
    assert any(not np.array_equal(x, z) for x, z in zip(a, c, strict=True))


def test_partitioners_leave_global_rng_alone():
    # The paper's code seeds numpy's global RNG; ours must not, so check the global stream.
    np.random.seed(123)  # noqa: NPY002
    expected = np.random.rand()  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    bloodmnist_paper(_labels(), 4)
    assert np.random.rand() == expected  # noqa: NPY002


def _mean_label_entropy(parts, y, num_classes):
    """Average per-client label entropy (nats); lower = more skewed."""
    ents = []
    for p in parts:
        freq = np.bincount(y[p], minlength=num_classes) / max(p.size, 1)
        nz = freq[freq > 0]
        ents.append(-(nz * np.log(nz)).sum())
    return float(np.mean(ents))


def test_dirichlet_small_alpha_is_skewed_vs_iid():
    y = _labels(2000, 10)
    skewed = dirichlet(y, 10, alpha=0.05, seed=0)
    flat = iid(y, 10, seed=0)
    assert _mean_label_entropy(skewed, y, 10) < 0.5 * _mean_label_entropy(flat, y, 10)
    assert min(p.size for p in skewed) >= 1


def test_dirichlet_min_size_and_error():
    y = _labels(200, 4)
    parts = dirichlet(y, 5, alpha=1.0, seed=0, min_size=10)
    assert min(p.size for p in parts) >= 10
    with pytest.raises(ValueError, match="larger alpha"):
        dirichlet(y, 20, alpha=1e-3, seed=0, min_size=9)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(y, 5, alpha=0.0, seed=0)


def test_iid_sizes_balanced():
    sizes = [p.size for p in iid(_labels(103), 10, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_quantity_skew_sizes():
    y = _labels(1000)
    skewed = [p.size for p in quantity_skew(y, 10, seed=0, sigma=2.0, min_size=5)]
    assert min(skewed) >= 5 and max(skewed) > 3 * min(skewed)
    equal = [p.size for p in quantity_skew(y, 10, seed=0, sigma=0.0)]
    assert max(equal) - min(equal) <= 1


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_classes_per_client(k):
    y = _labels(600, 10)
    parts = pathological(y, 20, classes_per_client=k, seed=0)
    assert all(np.unique(y[p]).size <= k for p in parts)
    assert all(p.size > 0 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(600))


def test_pathological_errors():
    y = _labels(100, 10)
    with pytest.raises(ValueError, match="classes_per_client"):
        pathological(y, 3, classes_per_client=2, seed=0)  # 6 shards < 10 classes
    with pytest.raises(ValueError, match="classes_per_client"):
        pathological(y, 3, classes_per_client=0, seed=0)


def test_bloodmnist_paper_matches_hand_computation():
    # N=25, n=4: base 6, last 25 % 4 = 1 shard one larger -> [6, 6, 6, 7].
    # np.random.seed(42); randint(0, int(6 * 0.5) = 3) twice -> r = 2, 0.
    # Exactly their calls (legacy global RNG, float `high`), to pin the hand computation.
    np.random.seed(42)  # noqa: NPY002
    r = [np.random.randint(low=0, high=3.0) for _ in range(2)]  # noqa: NPY002
    assert r == [2, 0]
    parts = bloodmnist_paper(np.zeros(25, dtype=int), 4)
    assert [p.size for p in parts] == [6 - 2, 6 + 2, 6 - 0, 7 + 0]
    # Contiguous ranges in file order: the moved tail of shard 0 opens shard 1.
    np.testing.assert_array_equal(parts[0], np.arange(0, 4))
    np.testing.assert_array_equal(parts[1], np.arange(4, 12))
    np.testing.assert_array_equal(parts[3], np.arange(18, 25))


def test_bloodmnist_paper_odd_clients_last_untouched():
    # N=31, n=3: base 10, sizes [10, 10, 11]; one pair, r = randint(0, 5) after seed 42 -> 3.
    parts = bloodmnist_paper(np.zeros(31, dtype=int), 3)
    r = np.random.RandomState(42).randint(0, 5)
    assert [p.size for p in parts] == [10 - r, 10 + r, 11]


def test_partition_seed_none_uses_partitioner_default():
    y = _labels(300)
    via_registry = partition("bloodmnist_paper", y, 10, None)
    direct = bloodmnist_paper(y, 10)  # seed=42, the paper's
    assert all(np.array_equal(a, b) for a, b in zip(via_registry, direct, strict=True))


def test_bloodmnist_paper_too_few_examples():
    with pytest.raises(ValueError, match="at least 2 examples per client"):
        bloodmnist_paper(np.zeros(5, dtype=int), 3)


def test_partition_bad_args():
    y = _labels(50)
    with pytest.raises(ValueError, match="valid names: iid"):
        partition("nope", y, 2, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        partition("iid", y, 0, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        partition("iid", y, 51, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        partition("dirichlet", y, 2, seed=0)  # alpha missing
    with pytest.raises(ValueError, match="labels"):
        iid(np.zeros((5, 2), dtype=int), 2, seed=0)
    with pytest.raises(ValueError, match="integer"):
        iid(np.zeros(5, dtype=float), 2, seed=0)


# --------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize(
    ("image_shape", "raw_shape"),
    [
        ((28, 28), (28, 28)),
        ((28, 28, 1), (28, 28)),
        ((28, 28, 3), (28, 28, 3)),
        ((8, 8, 8), (8, 8, 8)),
    ],
)
def test_synthetic_arrays_medmnist_format(image_shape, raw_shape):
    arrays = make_synthetic_arrays(4, image_shape, n_train=20, n_val=8, n_test=12, seed=0)
    for split, n in (("train", 20), ("val", 8), ("test", 12)):
        assert arrays[f"{split}_images"].shape == (n, *raw_shape)
        assert arrays[f"{split}_images"].dtype == np.uint8
        assert arrays[f"{split}_labels"].shape == (n, 1)
        assert arrays[f"{split}_labels"].dtype == np.uint8
    assert set(np.unique(arrays["train_labels"])) == {0, 1, 2, 3}


def test_synthetic_deterministic_and_learnable_signal():
    a = make_synthetic_arrays(seed=5, n_train=200, n_val=10, n_test=200)
    b = make_synthetic_arrays(seed=5, n_train=200, n_val=10, n_test=200)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    ds = synthetic_dataset(seed=5, n_train=200, n_val=10, n_test=200)
    # Nearest class mean beats chance (1/8) by a wide margin: the classes carry signal.
    xtr = ds.train.images.reshape(200, -1)
    means = np.stack([xtr[ds.train.labels == c].mean(0) for c in range(8)])
    xte = ds.test.images.reshape(200, -1)
    pred = np.argmin(((xte[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == ds.test.labels).mean() > 0.3


def test_synthetic_bad_shape():
    with pytest.raises(ValueError, match="image_shape"):
        make_synthetic_arrays(image_shape=(28,))


# --------------------------------------------------------------------------- medmnist io


@pytest.mark.parametrize(
    ("name", "image_shape", "expected"),
    [
        ("pneumoniamnist", (28, 28), (28, 28, 1)),
        ("bloodmnist", (28, 28, 3), (28, 28, 3)),
        ("adrenalmnist3d", (8, 8, 8), (8, 8, 8, 1)),
        ("mydata", (12, 12, 3), (12, 12, 3)),
    ],
)
def test_write_npz_load_round_trip(tmp_path, name, image_shape, expected):
    num_classes = {"pneumoniamnist": 2, "bloodmnist": 8, "adrenalmnist3d": 2}.get(name, 3)
    arrays = make_synthetic_arrays(num_classes, image_shape, n_train=16, n_val=4, n_test=6)
    write_npz(tmp_path / medmnist_filename(name), arrays)
    ds = load_medmnist(name, data_dir=tmp_path)
    assert isinstance(ds, Dataset) and ds.name == name and ds.num_classes == num_classes
    for split, n in (("train", 16), ("val", 4), ("test", 6)):
        s = getattr(ds, split)
        assert s.images.shape == (n, *expected) and s.images.dtype == np.float32
        assert s.labels.shape == (n,) and s.labels.dtype == np.int32
        assert s.images.min() >= -1.0 and s.images.max() <= 1.0
        np.testing.assert_array_equal(s.labels, arrays[f"{split}_labels"][:, 0])
        raw = arrays[f"{split}_images"].astype(np.float32)
        np.testing.assert_allclose(s.images.reshape(raw.shape), raw / 255 * 2 - 1, atol=1e-6)


def test_normalization_endpoints(tmp_path):
    arrays = make_synthetic_arrays(2, (4, 4), n_train=2, n_val=2, n_test=2)
    arrays["train_images"][0] = 0
    arrays["train_images"][1] = 255
    write_npz(tmp_path / "toy.npz", arrays)
    ds = load_medmnist("toy", data_dir=tmp_path)
    assert ds.train.images[0].max() == -1.0 and ds.train.images[1].min() == 1.0


def test_size_suffix_and_filename():
    assert medmnist_filename("bloodmnist") == "bloodmnist.npz"
    assert medmnist_filename("BloodMNIST", size=64) == "bloodmnist_64.npz"
    with pytest.raises(ValueError, match="size"):
        medmnist_filename("bloodmnist", size=0)


def test_missing_file_message(tmp_path):
    with pytest.raises(MissingDataError) as err:
        load_medmnist("bloodmnist", data_dir=tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "bloodmnist.npz") in msg
    assert "bloodmnist.npz" in msg
    assert "https://zenodo.org/records/10519652/files/bloodmnist.npz?download=1" in msg
    assert DATA_DIR_ENV in msg and "data_dir" in msg
    assert "medmnist.BloodMNIST(split='train', download=True" in msg
    assert 'pip install -e ".[medmnist]"' in msg  # README's spelling
    assert isinstance(err.value, FileNotFoundError)


def test_bad_files(tmp_path):
    arrays = make_synthetic_arrays(2, (6, 6), n_train=4, n_val=2, n_test=2)
    del arrays["val_labels"]
    np.savez(tmp_path / "nokeys.npz", **arrays)
    with pytest.raises(ValueError, match="val_labels"):
        load_medmnist("nokeys", data_dir=tmp_path)
    rgb = make_synthetic_arrays(8, (6, 6, 3), n_train=4, n_val=2, n_test=2)
    write_npz(tmp_path / "pneumoniamnist.npz", rgb)  # pneumonia must be gray
    with pytest.raises(ValueError, match="channel"):
        load_medmnist("pneumoniamnist", data_dir=tmp_path)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="re-download"):
        load_medmnist("broken", data_dir=tmp_path)
    with pytest.raises(NotImplementedError, match="multi-label"):
        load_medmnist("chestmnist", data_dir=tmp_path)


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir(None) == Path("~/.medmnist").expanduser()
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    write_npz(tmp_path / "env" / "toy.npz", make_synthetic_arrays(2, (4, 4), 2, 2, 2))
    assert load_medmnist("toy").train.images.shape == (2, 4, 4, 1)


@pytest.mark.parametrize(
    ("name", "shapes", "num_classes"),
    [
        ("pneumoniamnist", {"train": (4708, 28, 28, 1), "val": (524,), "test": (624,)}, 2),
        ("retinamnist", {"train": (1080, 28, 28, 3), "val": (120,), "test": (400,)}, 5),
        ("adrenalmnist3d", {"train": (1188, 28, 28, 28, 1), "val": (98,), "test": (298,)}, 2),
    ],
)
def test_real_shared_files(name, shapes, num_classes):
    data_dir = _shared_data_dir()
    if not (data_dir / medmnist_filename(name)).is_file():
        pytest.skip(f"{name}.npz not in {data_dir}")
    ds = load_medmnist(name, data_dir=data_dir)
    assert ds.num_classes == num_classes
    assert ds.train.images.shape == shapes["train"]
    for split in ("val", "test"):
        s = getattr(ds, split)
        assert s.images.shape[0] == s.labels.shape[0] == shapes[split][0]
        assert s.images.shape[1:] == shapes["train"][1:]
    assert ds.train.images.dtype == np.float32 and ds.train.labels.dtype == np.int32
    assert ds.train.images.min() >= -1.0 and ds.train.images.max() <= 1.0
    assert set(np.unique(ds.test.labels)) == set(range(num_classes))


# --------------------------------------------------------------------------- federated


def test_stack_clients_padding_mask_counts():
    images = np.arange(10 * 2 * 2, dtype=np.float32).reshape(10, 2, 2, 1) + 1.0
    labels = np.arange(10, dtype=np.int32)
    ca = stack_clients(
        {"image": images, "label": labels},
        [np.array([0, 3, 5]), np.array([9]), np.array([], int)],
        4,
    )
    assert isinstance(ca, ClientArrays) and ca.num_clients == 3
    assert ca.examples["image"].shape == (3, 4, 2, 2, 1) and ca.examples["label"].shape == (3, 4)
    np.testing.assert_array_equal(ca.counts, [3, 1, 0])
    assert ca.counts.dtype == np.int32 and ca.mask.dtype == np.float32
    np.testing.assert_array_equal(ca.mask, [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(ca.examples["label"][0, :3], [0, 3, 5])
    np.testing.assert_array_equal(ca.examples["image"][0, :3], images[[0, 3, 5]])
    assert np.all(ca.examples["image"][ca.mask == 0] == 0) and np.all(
        ca.examples["label"][ca.mask == 0] == 0
    )


def test_stack_clients_errors():
    images, labels = np.zeros((4, 2, 2, 1), np.float32), np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="outside"):
        stack_clients({"image": images, "label": labels}, [np.array([4])])
    with pytest.raises(ValueError, match="pad_multiple"):
        stack_clients({"image": images, "label": labels}, [np.array([0])], pad_multiple=0)
    with pytest.raises(ValueError, match="different numbers of examples"):
        stack_clients({"image": images, "label": labels[:3]}, [np.array([0])])


@pytest.mark.parametrize("n", [1, 2, 5, 7, 10])
def test_split_heldout_sizes(n):
    tr, ho = split_heldout(np.arange(n), 0.2, seed=0, client_id=1)
    assert tr.size == max(1, math.ceil(0.8 * n - 1e-9)) and tr.size + ho.size == n
    tr3, _ = split_heldout(np.arange(10), 0.3, seed=0)
    assert tr3.size == 7  # ceil(0.7 * 10), not 8 from float error in (1 - 0.3) * 10


def test_build_federated():
    ds = synthetic_dataset(4, (8, 8), n_train=60, n_val=4, n_test=10, seed=0)
    parts = iid(ds.train.labels, 3, seed=0)
    fed = build_federated(ds, parts, heldout_fraction=0.2, seed=7, pad_multiple=8)
    assert isinstance(fed, FederatedData)
    assert fed.num_classes == 4 and fed.name == "synthetic" and fed.test["image"] is ds.test.images
    np.testing.assert_array_equal(fed.train.counts, [16, 16, 16])
    np.testing.assert_array_equal(fed.heldout.counts, [4, 4, 4])
    assert fed.train.examples["image"].shape == (3, 16, 8, 8, 1) and fed.heldout.examples[
        "image"
    ].shape == (
        3,
        8,
        8,
        8,
        1,
    )
    for c, idx in enumerate(parts):
        tr, ho = split_heldout(idx, 0.2, seed=7, client_id=c)
        np.testing.assert_array_equal(np.sort(np.concatenate([tr, ho])), idx)
        np.testing.assert_array_equal(
            fed.train.examples["image"][c, : tr.size], ds.train.images[tr]
        )
        np.testing.assert_array_equal(
            fed.heldout.examples["label"][c, : ho.size], ds.train.labels[ho]
        )
    again = build_federated(ds, parts, heldout_fraction=0.2, seed=7, pad_multiple=8)
    np.testing.assert_array_equal(again.train.examples["label"], fed.train.examples["label"])
    none_held = build_federated(ds, parts, heldout_fraction=0.0)
    np.testing.assert_array_equal(none_held.heldout.counts, [0, 0, 0])
    assert none_held.heldout.mask.sum() == 0
