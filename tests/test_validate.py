"""Config validation: each bad field gives one clear error naming it, before any tracing."""

from __future__ import annotations

import pytest

from configs import debug, perfedavg_hetero
from jaxfl.data import MissingDataError, synthetic_dataset
from jaxfl.sweep import apply_overrides
from jaxfl.validate import ConfigError, validate_config, validate_dataset


def _config(**overrides):
    return apply_overrides(debug.get_config(), overrides)


def test_debug_config_is_valid():
    validate_config(debug.get_config())


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("algorithm.name", "fedsgd", "config.algorithm.name='fedsgd' is not known"),
        ("model.name", "vgg", "config.model.name='vgg' is not known"),
        ("partition.name", "by_site", "config.partition.name='by_site' is not known"),
        ("data.source", "kaggle", "config.data.source='kaggle' is not known"),
        ("strategy", "pmap", "config.strategy='pmap' is not known"),
        ("local.optimizer", "lion", "config.local.optimizer='lion' is not known"),
        ("server.learning_rate", 0.0, "config.server.learning_rate=0.0 must be a positive"),
        ("local.epochs", 0, "config.local.epochs=0 must be a positive int"),
        ("num_clients", -2, "config.num_clients=-2 must be a positive int"),
        ("rounds", 0, "config.rounds=0 must be a positive int"),
        ("partition.heldout_fraction", 1.0, "config.partition.heldout_fraction=1.0 must be"),
        ("client_fraction", 1.5, "config.client_fraction=1.5 must be in (0, 1]"),
        ("clients_per_round", 9, "config.clients_per_round=9 but there are 8 clients"),
        ("checkpoint_every", -1, "config.checkpoint_every=-1 must be >= 0"),
    ],
)
def test_each_bad_field_is_named(field, value, message):
    with pytest.raises(ConfigError) as e:
        validate_config(_config(**{field: value}))
    assert message in str(e.value)


def test_fedprox_negative_mu():
    with pytest.raises(ConfigError, match="config.algorithm.mu=-1.0 must be >= 0"):
        validate_config(_config(**{"algorithm.name": "fedprox", "algorithm.mu": -1.0}))


def test_all_errors_reported_together():
    with pytest.raises(ConfigError) as e:
        validate_config(_config(**{"model.name": "vgg", "rounds": 0}))
    assert "model.name" in str(e.value) and "config.rounds" in str(e.value)


def test_count_and_fraction_both_set():
    with pytest.raises(ConfigError, match="both set"):
        validate_config(_config(clients_per_round=2, client_fraction=0.5))


def test_missing_data_file_names_path_and_download(tmp_path):
    config = _config(**{"data.source": "medmnist", "data.name": "bloodmnist"})
    config.data.data_dir = str(tmp_path)
    with pytest.raises(MissingDataError) as e:
        validate_config(config)
    assert str(tmp_path / "bloodmnist.npz") in str(e.value)
    assert "zenodo.org/records/10519652" in str(e.value)


def test_more_clients_than_examples():
    data = synthetic_dataset(num_classes=2, image_shape=(8, 8, 1), n_train=6, n_val=2, n_test=2)
    with pytest.raises(ConfigError, match="num_clients=8 but .* only 6 training examples"):
        validate_dataset(debug.get_config(), data)


def test_images_too_small_for_the_model():
    data = synthetic_dataset(num_classes=2, image_shape=(3, 3, 1), n_train=20, n_val=2, n_test=2)
    with pytest.raises(ConfigError, match="at least 4 pixels per side"):
        validate_dataset(debug.get_config(), data)


def test_bloodmnist_config_reads_an_official_format_file(tmp_path):
    from configs import bloodmnist_fedavg
    from jaxfl import factories
    from jaxfl.data import make_synthetic_arrays, write_npz

    config = bloodmnist_fedavg.get_config()
    config.data.data_dir = str(tmp_path)
    with pytest.raises(MissingDataError, match="bloodmnist.npz"):
        validate_config(config)
    arrays = make_synthetic_arrays(8, (28, 28, 3), n_train=300, n_val=20, n_test=20)
    write_npz(tmp_path / "bloodmnist.npz", arrays)
    validate_config(config)
    dataset = factories.build_dataset(config)
    validate_dataset(config, dataset)
    fed = factories.build_federated_data(config, dataset)
    assert fed.train.num_clients == 10 and fed.num_classes == 8
    assert factories.build_model(config, fed.num_classes).__class__.__name__ == "DPResNet"


def test_unknown_per_example_mode_in_record_dp():
    with pytest.raises(ConfigError, match="config.dp.per_example='loop' is not known"):
        validate_config(_config(**{"dp.mode": "record", "dp.per_example": "loop"}))


def test_perfedavg_hetero_config_validates_and_falls_back_to_synthetic(tmp_path):
    config = perfedavg_hetero.get_config()
    config.data.data_dir = str(tmp_path)  # no bloodmnist.npz here
    validate_config(config)
    config.data.fallback = ""
    with pytest.raises(MissingDataError, match="bloodmnist.npz"):
        validate_config(config)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"algorithm.name": "perfedavg_fo", "algorithm.beta": 0.0}, "algorithm.beta=0.0"),
        (
            {"algorithm.name": "perfedavg_hf", "dp.mode": "local_update"},
            "not supported with algorithm",
        ),
        ({"algorithm.name": "local", "clients_per_round": 2}, "trains every client every round"),
        ({"personalization.enabled": True, "personalization.adapt_lr": 0.0}, "adapt_lr=0.0"),
    ],
)
def test_personalization_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_config(**overrides))


def test_heterogeneity_spec_errors_name_the_field():
    config = _config(**{"heterogeneity.preset": "pppml_hmi"})  # slice thickness needs 3D data
    dataset = synthetic_dataset(4, (28, 28, 1), n_train=100, n_val=0, n_test=10)
    with pytest.raises(ConfigError, match="config.heterogeneity: .*slice_thickness"):
        validate_dataset(config, dataset)


def test_the_model_must_fit_the_task():
    """Per-pixel logits for segmentation, one label per image otherwise; the per-pixel MLP
    (the CT attack config's model) is accepted only where it fits."""
    from configs import attack_dlg_ct

    validate_config(attack_dlg_ct.get_config())
    seg = attack_dlg_ct.get_config()
    seg.model.per_pixel = False
    with pytest.raises(ConfigError, match="segmentation needs per-pixel logits"):
        validate_config(seg)
    image_level = debug.get_config()
    image_level.model.name, image_level.model.per_pixel = "mlp", True
    with pytest.raises(ConfigError, match="'mlp' predicts per-pixel logits here"):
        validate_config(image_level)
