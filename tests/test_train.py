"""End to end: the debug config trains, learns and writes metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from configs import debug
from jaxfl import factories
from jaxfl.sweep import apply_overrides
from jaxfl.train import train_and_evaluate

REQUIRED = {"round", "train_loss", "test_accuracy", "test_auc", "test_loss", "wall_time_s"}


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    config = debug.get_config()
    workdir = tmp_path_factory.mktemp("debug")
    return train_and_evaluate(config, workdir), workdir, config


def test_fedavg_learns_synthetic_task(debug_run):
    final, _, _ = debug_run
    assert final["test_accuracy"] > 0.9
    assert final["test_auc"] > 0.95


def test_metrics_jsonl_has_one_line_per_round(debug_run):
    _, workdir, config = debug_run
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == list(range(1, config.rounds + 1))
    for m in lines:
        assert m.keys() >= REQUIRED
        assert len(m["heldout_accuracy"]) == config.num_clients
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert json.loads((workdir / "config.json").read_text())["num_clients"] == config.num_clients


def _small(**overrides):
    config = debug.get_config()
    config.rounds = 2
    config.num_clients = 4
    config.data.n_train = 240
    config.data.n_test = 80
    config.local.epochs = 1
    config.checkpoint_every = 0
    return apply_overrides(config, overrides)


@pytest.mark.parametrize("name", ["perfedavg_fo", "fedprox"])
def test_personalized_evaluation_is_logged_next_to_the_global_model(tmp_path, name):
    config = _small(**{"algorithm.name": name, "personalization.enabled": True})
    final = train_and_evaluate(config, tmp_path)
    assert len(final["personalized_accuracy"]) == config.num_clients
    assert 0 <= final["personalized_accuracy_mean"] <= 1
    assert final["personalized_accuracy_std"] >= 0
    assert final.keys() >= {"test_accuracy", "heldout_accuracy_mean", "heldout_accuracy_std"}


def test_local_only_baseline_reports_per_client_models_only(tmp_path):
    final = train_and_evaluate(_small(**{"algorithm.name": "local"}), tmp_path)
    assert len(final["personalized_accuracy"]) == 4
    assert "test_accuracy" not in final and "heldout_accuracy" not in final
    assert final["local_steps_mean"] > 0


def test_heterogeneity_shifts_client_data_but_not_the_test_split():
    plain = _small()
    shifted = _small(**{"heterogeneity.strength": 0.8})
    dataset = factories.build_dataset(plain)
    a = factories.build_federated_data(plain, dataset)
    b = factories.build_federated_data(shifted, dataset)
    assert (a.train.examples["image"] != b.train.examples["image"]).any() and (
        a.heldout.examples["image"] != b.heldout.examples["image"]
    ).any()
    assert (a.train.examples["label"] == b.train.examples["label"]).all() and (
        a.test["image"] == b.test["image"]
    ).all()
    pad = b.train.mask == 0
    assert (b.train.examples["image"][pad] == 0).all()


def test_missing_medmnist_file_can_fall_back_to_synthetic_with_a_warning(tmp_path, caplog):
    config = _small(**{"data.source": "medmnist", "data.name": "bloodmnist",
                       "data.data_dir": str(tmp_path), "data.fallback": "synthetic"})  # fmt: skip
    with caplog.at_level("WARNING"):
        dataset = factories.build_dataset(config)
    assert dataset.name == "synthetic (no bloodmnist file)"
    assert "SYNTHETIC" in caplog.text and "zenodo" in caplog.text.lower()


def test_heterogeneity_can_be_listed_per_client_in_a_config_file():
    config = _small()
    config.heterogeneity.clients = [{"scale": 0.5}, {}, {"blur_sigma": 1.0}, {"gamma": 2.0}]
    shifts = factories.build_shifts(config, is_3d=False)
    assert [s.is_identity for s in shifts] == [False, True, False, False]
    assert shifts[0].scale == 0.5 and shifts[2].blur_sigma == 1.0
    config.heterogeneity.clients = [{"scale": 0.5}]
    with pytest.raises(ValueError, match="1 per-client settings for 4 clients"):
        factories.build_shifts(config, is_3d=False)


def test_classification_metrics_pinned_across_the_task_refactor(tmp_path):
    # Recorded from the debug run before classification became a Task (commit c494051): the
    # Task interface and the one local-training loop must not move a single number.
    final = train_and_evaluate(_small(), tmp_path)
    expected = {
        "train_loss": 1.4233972420964216,
        "train_accuracy": 0.36787564766839376,
        "test_accuracy": 0.3,
        "test_auc": 0.6891666666666667,
        "test_loss": 1.3648300494940593,
    }
    for key, value in expected.items():
        assert final[key] == pytest.approx(value, rel=1e-6), key
    assert final["heldout_accuracy"] == pytest.approx(
        [0.1875, 0.5555555555555556, 0.2727272727272727, 0.2727272727272727], rel=1e-6
    )
