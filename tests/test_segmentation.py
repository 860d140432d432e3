"""Segmentation end to end: the Task's masking, CT federation by patient, the engine's strategies,
DP-SGD and every privacy mode with a U-Net."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    client_data,
    clipped_sum_reference,
    numpy_init,
    reference_round,
)

from configs import seg_debug
from jaxfl import factories
from jaxfl.algorithms import fedavg
from jaxfl.backends import make_backend
from jaxfl.data import ct
from jaxfl.data.segmentation import PAD_VALUE, pad_to_multiple
from jaxfl.errors import ConfigError, UserError
from jaxfl.models import UNet
from jaxfl.privacy.dp_sgd import dp_sgd_gradient, poisson_order
from jaxfl.seg_figure import plot_segmentation
from jaxfl.simulate import Simulator
from jaxfl.sweep import apply_overrides
from jaxfl.tasks import make_loss
from jaxfl.tasks.segmentation import IGNORE_LABEL, Segmentation
from jaxfl.train import train_and_evaluate
from jaxfl.types import ClientArrays

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK = Segmentation(num_classes=2, loss="ce+dice")
TINY = UNet(num_classes=2, base_features=4, depth=1, groups=2)


def _seg_arrays(counts, n_slots, size=8, seed=0) -> ClientArrays:
    """Random slices with blob-ish binary masks, padded to ``n_slots`` per client."""
    rng = np.random.default_rng(seed)
    k = len(counts)
    image = np.zeros((k, n_slots, size, size, 1), np.float32)
    mask = np.zeros((k, n_slots, size, size), np.int32)
    valid = np.zeros((k, n_slots), np.float32)
    for c, n in enumerate(counts):
        m = (rng.uniform(size=(n, size, size)) > 0.7).astype(np.int32)
        mask[c, :n] = m
        image[c, :n, ..., 0] = m + rng.normal(0.0, 0.5, (n, size, size))
        valid[c, :n] = 1.0
    case = np.tile(np.arange(n_slots, dtype=np.int32) // 2, (k, 1))
    return ClientArrays(
        {"image": image, "mask": mask, "case": case}, valid, np.asarray(counts, np.int32)
    )


@pytest.fixture(scope="module")
def tiny_params():
    return numpy_init(TINY, (1, 8, 8, 1))


def _small_config(**overrides):
    config = seg_debug.get_config()
    config.rounds = 1
    config.num_clients = 3
    config.data.ct.patients_per_site = 3
    config.data.ct.num_slices = 6
    config.data.ct.phantom_size = (16, 16)
    config.data.ct.test_fraction = 0.34
    config.partition.heldout_fraction = 0.33
    config.model.base_features = 4
    config.model.depth = 1
    config.model.groups = 2
    config.local.epochs = 1
    config.checkpoint_every = 0
    return apply_overrides(config, overrides)


# --------------------------------------------------------------------------- the Task


def test_loss_ignores_padded_pixels_and_padded_examples():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 6, 2)).astype(np.float32)
    mask = (rng.uniform(size=(2, 6, 6)) > 0.6).astype(np.int32)
    batch = {"image": logits, "mask": mask, "case": np.zeros(2, np.int32)}
    # Pad 2 pixels of every side with garbage logits and ignored labels.
    big = np.pad(logits, [(0, 0), (2, 2), (2, 2), (0, 0)])
    big[:, :2] = 50.0
    big_mask = np.pad(mask, [(0, 0), (2, 2), (2, 2)], constant_values=IGNORE_LABEL)
    padded = {"image": big, "mask": big_mask, "case": batch["case"]}
    for kind in ("ce", "dice", "ce+dice"):
        task = Segmentation(loss=kind, class_weights=(1.0, 5.0) if kind != "dice" else None)
        np.testing.assert_allclose(
            task.example_losses(jnp.asarray(big), padded),
            task.example_losses(jnp.asarray(logits), batch),
            rtol=1e-5,
        )
    counts = TASK.eval_stats(jnp.asarray(big), padded)
    ref = TASK.eval_stats(jnp.asarray(logits), batch)
    for k in ("inter", "pred", "true"):
        np.testing.assert_array_equal(counts[k], ref[k])
    # Padded examples (mask 0) add nothing, even holding NaN logits.
    loss = make_loss(TASK, lambda variables, x: x)
    extra = {
        "image": np.concatenate([logits, np.full((1, 6, 6, 2), np.nan, np.float32)]),
        "mask": np.concatenate([mask, np.zeros((1, 6, 6), np.int32)]),
        "case": np.zeros(3, np.int32),
    }
    mean, sums = loss({}, batch, jnp.ones(2))
    mean_p, sums_p = loss({}, extra, jnp.asarray([1.0, 1.0, 0.0]))
    np.testing.assert_allclose(mean_p, mean, rtol=1e-6)
    for k in sums:
        np.testing.assert_allclose(sums_p[k], sums[k], rtol=1e-6)


def test_train_and_eval_metrics_from_sums():
    assert TASK.train_metrics({"loss_sum": 3.0, "num_seen": 2.0, "dice_inter": 3.0,
                               "dice_pred": 4.0, "dice_true": 2.0}) == {
        "train_loss": 1.5, "train_dice": 1.0
    }  # fmt: skip
    stats = {
        "inter": np.array([[2], [0], [0]]),
        "pred": np.array([[3], [0], [1]]),
        "true": np.array([[3], [0], [0]]),
        "loss": np.array([0.5, 0.1, 0.3]),
    }
    examples = {"case": np.array([0, 0, 1])}
    out = TASK.evaluate(stats, examples)
    # Case 0: 2*2/6; case 1: a false positive on an empty case scores 0.
    assert out["dice"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert out["iou"] == pytest.approx((2 / 4 + 0.0) / 2)
    assert out["loss"] == pytest.approx(0.3)
    # Slice Dice leaves out the slice with nothing in truth and prediction.
    assert out["slice_dice"] == pytest.approx((2 / 3 + 0.0) / 2)
    held = TASK.client_metrics(stats, examples, np.array([True, True, False]))
    assert held == {"dice": pytest.approx(2 / 3), "iou": pytest.approx(0.5)}
    assert np.isnan(TASK.client_metrics(stats, examples, np.zeros(3, bool))["dice"])


def test_task_checks_masks():
    good = {"image": np.zeros((2, 4, 4, 1)), "mask": np.zeros((2, 4, 4), np.int32), "case": [0, 1]}
    TASK.check(good, 2, "train")
    with pytest.raises(ValueError, match="integer labels"):
        TASK.check({**good, "mask": np.zeros((2, 4, 4))}, 2, "train")
    with pytest.raises(ValueError, match="without their channel axis"):
        TASK.check({**good, "mask": np.zeros((2, 4, 5), np.int32)}, 2, "train")
    with pytest.raises(ValueError, match="2 classes"):
        TASK.check({**good, "mask": np.full((2, 4, 4), 3, np.int32)}, 2, "train")
    with pytest.raises(ValueError, match="needs features"):
        TASK.check({"image": good["image"], "mask": good["mask"]}, 2, "train")
    with pytest.raises(ValueError, match="loss"):
        Segmentation(loss="focal")


# --------------------------------------------------------------------------- data


def test_pad_to_multiple_pads_with_air_and_ignored_labels():
    slices = ct.SliceSet(
        image=np.zeros((2, 5, 6, 1), np.float32),
        mask=np.ones((2, 5, 6), np.int32),
        patient=np.zeros(2, np.int32),
        site=np.zeros(2, np.int32),
        slice_index=np.arange(2, dtype=np.int32),
        patients=("p",),
        sites=("s",),
    )
    out = pad_to_multiple(slices, 4)
    assert out.image.shape == (2, 8, 8, 1) and out.mask.shape == (2, 8, 8)
    np.testing.assert_array_equal(out.image[:, 1:6, 1:7], 0.0)
    np.testing.assert_array_equal(out.mask[:, 1:6, 1:7], 1)
    assert (out.image == PAD_VALUE).sum() == 2 * (64 - 30)
    assert (out.mask == IGNORE_LABEL).sum() == 2 * (64 - 30)
    assert pad_to_multiple(slices, 1) is slices


def test_phantom_federation_keeps_patients_in_one_split_and_one_client():
    config = _small_config(**{"data.ct.patients_per_site": 4, "num_clients": 4})
    fed = factories.build_segmentation_data(config)
    assert fed.train.num_clients == 4 and fed.num_classes == 2

    def patients(arrays, c):
        return set(np.asarray(arrays.examples["case"])[c][np.asarray(arrays.mask)[c] > 0])

    train = [patients(fed.train, c) for c in range(4)]
    held = [patients(fed.heldout, c) for c in range(4)]
    test = set(np.asarray(fed.test["case"]).tolist())
    for c in range(4):
        assert train[c] and held[c]
        assert not train[c] & held[c] and not (train[c] | held[c]) & test
        for other in range(c):
            assert not (train[c] | held[c]) & (train[other] | held[other])
    # Every mask is binary or ignored padding and the image is in [-1, 1].
    masks = np.asarray(fed.train.examples["mask"])
    assert set(np.unique(masks)) <= {IGNORE_LABEL, 0, 1}
    assert np.abs(fed.test["image"]).max() <= 1.0


def test_num_clients_must_match_the_sites():
    config = _small_config()
    config.data.source = "ct_manifest"
    with pytest.raises(ConfigError, match="manifest"):
        factories.build_segmentation_data(config)


# --------------------------------------------------------------------------- the engine


def test_segmentation_round_matches_the_reference_loop_under_every_strategy(tiny_params):
    arrays = _seg_arrays([5, 3, 8, 2], n_slots=8)
    algorithm = fedavg(
        make_loss(TASK, TINY.apply), optax.sgd(0.1), optax.sgd(1.0), batch_size=4, epochs=1
    )
    ref = reference_round(algorithm, tiny_params, arrays, range(4), 2, 0)
    # The backends are task-agnostic (tests/test_backends.py runs every one): one vmapped, one
    # Python loop and one sharded here show the segmentation Task through each kind.
    for strategy, devices in [("vmap", 0), ("loop", 0), ("shard_map", 4)]:
        backend = make_backend(strategy, chunk_size=3, devices=jax.devices()[:devices] or None)
        sim = Simulator(algorithm, arrays, seed=2, backend=backend, task=TASK)
        state, metrics = sim.run_round(algorithm.init(tiny_params), 0)
        assert_trees_close(state.params, ref.params, atol=2e-5)
        assert 0.0 <= metrics["train_dice"] <= 1.0, strategy


def test_dp_sgd_with_a_unet_equals_a_per_example_loop(tiny_params):
    loss = make_loss(TASK, TINY.apply)
    data = client_data(_seg_arrays([10], n_slots=12), 0)
    key = jax.random.key(5)
    clip = 0.2
    out = jax.jit(
        lambda p, d, k: dp_sgd_gradient(
            loss,
            p,
            d,
            k,
            sampling_rate=0.5,
            clip_norm=clip,
            noise_multiplier=0.0,
            expected_batch_size=5.0,
            microbatch_size=4,
        )  # fmt: skip
    )(tiny_params, data, key)
    order, count = poisson_order(jax.random.split(key)[0], data.mask, 0.5)
    selected = np.asarray(order)[: int(count)]
    assert 0 < len(selected) < 10
    ref = clipped_sum_reference(loss, tiny_params, data, selected, clip)
    for a, b in zip(jax.tree.leaves(out.grad), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) / 5.0, atol=1e-6, rtol=2e-5)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow  # ~50 s: the end-to-end learning check of the debug config
def test_seg_debug_config_learns(tmp_path):
    config = seg_debug.get_config()
    config.rounds = 14
    final = train_and_evaluate(config, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 14
    assert final["test_dice"] > 0.5, final
    assert len(final["heldout_dice"]) == config.num_clients
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(  # DP-SGD through a U-Net: test_dp_sgd_with_a_unet_equals_a_per_example_loop
            {"dp.mode": "record", "dp.noise_multiplier": 1.0, "dp.clip_norm": 1.0},
            marks=pytest.mark.slow,
        ),
        pytest.param(  # local update DP is task-agnostic: clips the update on the host
            {"dp.mode": "local_update", "dp.noise_multiplier": 0.5, "dp.clip_norm": 1.0},
            marks=pytest.mark.slow,
        ),
        # Secure aggregation is task-agnostic (host side): both run on segmentation in the slow
        # suite, and on classification in the default one (test_secure_rounds.py).
        pytest.param({"secure.aggregator": "secagg"}, marks=pytest.mark.slow),
        pytest.param({"secure.aggregator": "ckks_ring"}, marks=pytest.mark.slow),
        pytest.param(  # Per-FedAvg + personalization also runs in the figure test
            {"algorithm.name": "perfedavg_fo", "personalization.enabled": True},
            marks=pytest.mark.slow,
        ),
        pytest.param(
            {"algorithm.name": "perfedavg_hf", "dp.mode": "record", "dp.noise_multiplier": 1.0},
            marks=pytest.mark.slow,
        ),
        pytest.param({"algorithm.name": "local"}, marks=pytest.mark.slow),
    ],
    ids=["record_dp", "local_dp", "secagg", "ckks", "perfedavg", "perfedavg_dp", "local"],
)
def test_every_privacy_mode_runs_segmentation(tmp_path, overrides):
    final = train_and_evaluate(_small_config(**overrides), tmp_path)
    key = "personalized_dice" if overrides.get("algorithm.name") == "local" else "test_dice"
    assert key in final, sorted(final)
    if "dp.mode" in overrides:
        assert np.isfinite(final["epsilon"]) and final["epsilon"] > 0
    if overrides.get("personalization.enabled"):
        assert len(final["personalized_dice"]) == 3


@pytest.mark.parametrize(
    "algorithm", ["perfedavg_fo", pytest.param("local", marks=pytest.mark.slow)]
)
def test_segmentation_figure_is_drawn_from_a_finished_run(tmp_path, algorithm):
    overrides = {"algorithm.name": algorithm, "personalization.enabled": algorithm != "local"}
    train_and_evaluate(_small_config(**overrides), tmp_path / "run")
    out = plot_segmentation(tmp_path / "run", tmp_path / "fig.png")
    assert out.stat().st_size > 10_000
    with pytest.raises(UserError, match="config.json"):
        plot_segmentation(tmp_path, tmp_path / "other.png")


def _shared_data_dir() -> Path | None:
    for candidate in (os.environ.get("JAXFL_DATA_DIR"), REPO_ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / ct.TOTALSEG_EXAMPLE_IMAGE).is_file():
            return Path(candidate)
    return None


@pytest.mark.skipif(_shared_data_dir() is None, reason="TotalSegmentator example not available")
def test_real_nifti_pair_runs_end_to_end(tmp_path):
    # One patient: a check that the real-file path works, not a result.
    config = _small_config(
        **{
            "data.source": "totalseg_example",
            "data.name": "totalseg_liver",
            "data.data_dir": str(_shared_data_dir()),
            "data.ct.label_map": ((ct.TOTALSEG_LIVER, 1),),
            "data.ct.lung_only": False,
            "data.ct.test_fraction": 0.0,
            "data.ct.pad_multiple": 2,
            "partition.heldout_fraction": 0.0,
            "num_clients": 1,
        }
    )
    final = train_and_evaluate(config, tmp_path)
    assert np.isfinite(final["train_loss"]) and 0.0 <= final["train_dice"] <= 1.0
    assert "test_dice" not in final  # one patient: no test split
