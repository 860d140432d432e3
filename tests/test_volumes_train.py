"""3D classification end to end: RAD-ChestCT files and synthetic volumes through the launcher."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest
from helpers import write_radchest

from configs import debug
from jaxfl.errors import ConfigError
from jaxfl.train import load_federated_data, train_and_evaluate

TINY_DENSENET = dict(
    name="densenet", growth_rate=4, block_config=(1, 1), init_features=8, stem_kernel=3
)


def _volume_config(**changes) -> ml_collections.ConfigDict:
    config = debug.get_config()
    config.model = ml_collections.ConfigDict(TINY_DENSENET)
    config.num_clients = 3
    config.heterogeneity.preset = "pppml_hmi"  # slice thickness 1 / 5 / 10
    config.local.batch_size = 8
    config.local.epochs = 1
    config.local.learning_rate = 1e-3
    config.rounds = 1
    config.eval_batch_size = 16
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


# Each table a hospital, 10 scans each; scans with a finding carry a dense lesion.
LABELS = {
    site: [(f"{prefix}{i:05d}", i % 2, 0, 0) for i in range(10)]
    for site, prefix in (("train", "trn"), ("valid", "val"), ("test", "tst"))
}


@pytest.fixture(scope="module")
def radchest_dir(tmp_path_factory):
    return write_radchest(tmp_path_factory.mktemp("radchest"), LABELS, shape=(10, 16, 16))


def _radchest_config(root, **changes):
    return _volume_config(
        **{
            "data.source": "radchest",
            "data.name": "radchest",
            "data.data_dir": str(root),
            "data.volume.shape": (8, 8, 8),
            "data.volume.test_fraction": 0.2,
            **changes,
        }
    )


def test_radchest_sites_are_clients_with_their_slice_thickness(radchest_dir):
    fed = load_federated_data(_radchest_config(radchest_dir))
    assert fed.train.examples["image"].shape[2:] == (8, 8, 8, 1)
    # 10 scans per site: 2 to the global test split, 8 left, 20% of them held out.
    np.testing.assert_array_equal(fed.train.counts, [7, 7, 7])
    np.testing.assert_array_equal(fed.heldout.counts, [1, 1, 1])
    assert len(fed.test["label"]) == 6
    image = np.asarray(fed.train.examples["image"])
    # Site 2 averages 10 slices: one thick slice, then zero padding up to depth 8.
    assert np.all(image[2, :7, 1:] == 0.0) and not np.all(image[2, :7, 0] == 0.0)
    assert not np.all(image[0, :7, 1:] == 0.0)  # site 0: thickness 1, untouched
    with pytest.raises(ConfigError, match="3 sites"):
        load_federated_data(_radchest_config(radchest_dir, num_clients=4))


PRIVACY = {
    "ckks_ring": {"secure.aggregator": "ckks_ring"},
    "record_dp": {"dp.mode": "record", "dp.noise_multiplier": 1.0, "dp.microbatch_size": 8},
    "local_update_dp": {"dp.mode": "local_update", "dp.clip_norm": 1.0},
    "secagg": {"secure.aggregator": "secagg"},
    "perfedavg_dp": {"algorithm.name": "perfedavg_pppml", "dp.mode": "record"},
}
SLOW = ("ckks_ring", "record_dp", "local_update_dp", "secagg", "perfedavg_dp")


@pytest.mark.parametrize(
    "mode", [pytest.param(m, marks=[pytest.mark.slow] if m in SLOW else []) for m in PRIVACY]
)
def test_every_privacy_mode_runs_on_volumes(radchest_dir, tmp_path, mode):
    config = _radchest_config(radchest_dir, **PRIVACY[mode])
    final = train_and_evaluate(config, tmp_path / mode)
    assert np.isfinite(final["test_loss"]) and 0.0 <= final["test_auc"] <= 1.0
    if config.dp.mode != "none":
        assert final["epsilon"] > 0


def test_tiny_3d_run_learns_on_synthetic_volumes(tmp_path):
    # 3 hospitals x 20 synthetic scans; those with a finding hold a dense block (the label).
    labels = {
        site: [(f"{prefix}{i:05d}", i % 2, 0, 0) for i in range(20)]
        for site, prefix in (("train", "trn"), ("valid", "val"), ("test", "tst"))
    }
    (tmp_path / "data").mkdir()
    root = write_radchest(tmp_path / "data", labels, shape=(10, 16, 16))
    config = _radchest_config(root, **{"local.epochs": 2, "local.batch_size": 4, "rounds": 4})
    config.model = ml_collections.ConfigDict(dict(name="cnn"))
    final = train_and_evaluate(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert final["test_auc"] > 0.9, final


def test_volume_shift_figure_shows_each_site_before_and_after(radchest_dir, tmp_path):
    from jaxfl.volume_figure import plot_volume_shifts, site_volumes

    config = _radchest_config(radchest_dir)
    before, after, shifts = site_volumes(config)
    assert [s.slice_thickness for s in shifts] == [1, 5, 10]
    np.testing.assert_array_equal(after[0], before[0])  # site 0: thickness 1
    assert np.all(after[2][1:] == 0.0) and not np.all(before[2][1:] == 0.0)  # one thick slice
    out = plot_volume_shifts(config, tmp_path / "shift.png")
    assert out.stat().st_size > 10_000
