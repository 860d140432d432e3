"""Tests for jaxfl.tasks.seg_ops: segmentation losses and count-based Dice / IoU metrics.

Every expected value is either written out by hand (tiny masks) or computed by an independent
numpy reference (explicit log-softmax, explicit pixel loops), never by the module itself.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfl.tasks.seg_ops import (
    balanced_class_weights,
    dice_from_counts,
    dice_stats,
    iou_from_counts,
    per_case_counts,
    per_case_dice,
    per_case_iou,
    per_slice_dice,
    per_slice_iou,
    pixel_cross_entropy,
    segmentation_loss,
    soft_dice_loss,
    summarize,
)


def _one_hot_logits(labels, num_classes, scale=50.0):
    """Confident logits whose argmax is ``labels``: ``scale`` on the label, 0 elsewhere."""
    return scale * jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=jnp.float32)


def _stats(rows):
    """dice_stats-like dict from rows of (inter, pred, true) for one foreground class: [N, 1]."""
    arr = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    return {k: arr[:, i : i + 1] for i, k in enumerate(("inter", "pred", "true"))}


# ------------------------------------------------------------------------------------------
# Dice / IoU against hand-computed values


def test_dice_iou_binary_3x3_by_hand():
    pred = jnp.array([[[1, 1, 0], [0, 1, 0], [0, 0, 0]]])
    true = jnp.array([[[1, 0, 0], [0, 1, 0], [0, 0, 1]]])
    s = dice_stats(pred, true, 2)
    # inter: (0,0), (1,1); pred: 3 pixels; true: 3 pixels.
    assert {k: np.asarray(v).tolist() for k, v in s.items()} == {
        "inter": [[2]],
        "pred": [[3]],
        "true": [[3]],
    }
    np.testing.assert_allclose(dice_from_counts(s["inter"], s["pred"], s["true"]), [[4 / 6]])
    np.testing.assert_allclose(iou_from_counts(s["inter"], s["pred"], s["true"]), [[2 / 4]])
    # Logits take the argmax path and give the same counts.
    s2 = dice_stats(_one_hot_logits(pred, 2), true, 2)
    for k in s:
        np.testing.assert_array_equal(s2[k], s[k])


def test_dice_iou_three_classes_by_hand():
    pred = jnp.array([[[1, 1, 2], [2, 0, 0], [1, 2, 2]]])
    true = jnp.array([[[1, 2, 2], [2, 2, 0], [0, 0, 2]]])
    s = dice_stats(_one_hot_logits(pred, 3), true, 3)
    # class 1: pred (0,0) (0,1) (2,0), true (0,0)                 -> I=1, P=3, T=1
    # class 2: pred (0,2) (1,0) (2,1) (2,2), true (0,1) (0,2) (1,0) (1,1) (2,2)
    #                                                             -> I=3, P=4, T=5
    np.testing.assert_array_equal(s["inter"], [[1, 3]])
    np.testing.assert_array_equal(s["pred"], [[3, 4]])
    np.testing.assert_array_equal(s["true"], [[1, 5]])
    np.testing.assert_allclose(per_slice_dice(s), [[2 / 4, 6 / 9]])
    np.testing.assert_allclose(per_slice_iou(s), [[1 / 3, 3 / 6]])


@pytest.mark.parametrize("score", [dice_from_counts, iou_from_counts])
def test_empty_mask_conventions(score):
    # Columns: both empty, truth only (T=5, P=0), prediction only (P=4, T=0), a normal one.
    inter, pred, true = [0, 0, 0, 2], [0, 0, 4, 2], [0, 5, 0, 2]
    one = score(inter, pred, true, empty="one")
    nan = score(inter, pred, true, empty="nan")
    np.testing.assert_array_equal(one, [1.0, 0.0, 0.0, 1.0])
    assert math.isnan(nan[0])
    np.testing.assert_array_equal(nan[1:], [0.0, 0.0, 1.0])
    assert one.dtype == np.float64
    with pytest.raises(ValueError, match="empty must be 'one' or 'nan'"):
        score(inter, pred, true, empty="zero")


def test_default_empty_conventions_slice_nan_case_one():
    stats = _stats([(0, 0, 0)])
    assert math.isnan(per_slice_dice(stats)[0, 0])
    assert math.isnan(per_slice_iou(stats)[0, 0])
    assert per_case_dice(stats, ["a"])[1][0, 0] == 1.0
    assert per_case_iou(stats, ["a"])[1][0, 0] == 1.0


# ------------------------------------------------------------------------------------------
# Per-case (volume-level) aggregation and summaries


def test_per_case_dice_is_volume_level_not_mean_of_slices():
    # Case A: slice 0 perfect (I=P=T=1, Dice 1), slice 1 missed (T=9, Dice 0).
    # Volume: I=1, P=1, T=10 -> 2/11, whereas the mean slice Dice is 0.5.
    stats = _stats([(1, 1, 1), (0, 0, 9)])
    ids, dice = per_case_dice(stats, ["A", "A"])
    assert ids.tolist() == ["A"]
    np.testing.assert_allclose(dice, [[2 / 11]])
    assert np.nanmean(per_slice_dice(stats)) == pytest.approx(0.5)
    ids, iou = per_case_iou(stats, ["A", "A"])
    np.testing.assert_allclose(iou, [[1 / 10]])


def test_per_case_dice_equals_dice_of_stacked_volume():
    # Independent reference: stack a case's slices into one tall image and count it at once.
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, (5, 6, 7))
    true = rng.integers(0, 3, (5, 6, 7))
    case = np.array([2, 0, 2, 1, 0])
    s = dice_stats(jnp.asarray(pred), jnp.asarray(true), 3)
    ids, dice = per_case_dice(s, case)
    assert ids.tolist() == [0, 1, 2]
    for k, c in enumerate(ids):
        vol_p = pred[case == c].reshape(1, -1, 7)
        vol_t = true[case == c].reshape(1, -1, 7)
        ref = dice_stats(jnp.asarray(vol_p), jnp.asarray(vol_t), 3)
        np.testing.assert_allclose(
            dice[k], dice_from_counts(ref["inter"], ref["pred"], ref["true"])[0]
        )


def test_per_case_valid_mask_drops_padding_and_string_ids_sorted():
    # Row 3 is padding: counted under "caseA" it would change A's Dice to 102/111.
    stats = _stats([(2, 4, 4), (1, 1, 1), (0, 0, 9), (50, 50, 50)])
    case_ids = ["caseB", "caseA", "caseA", "caseA"]
    valid = [True, True, True, False]
    ids, dice = per_case_dice(stats, case_ids, valid)
    assert ids.tolist() == ["caseA", "caseB"]
    np.testing.assert_allclose(dice[:, 0], [2 / 11, 4 / 8])
    _, counts = per_case_counts(stats, case_ids, valid)
    np.testing.assert_array_equal(counts["true"][:, 0], [10, 4])
    # Without the mask the padding does count (so the mask is what removed it).
    _, dice_all = per_case_dice(stats, case_ids)
    np.testing.assert_allclose(dice_all[:, 0], [102 / 111, 4 / 8])
    # Padding also leaves the per-slice scores.
    np.testing.assert_allclose(per_slice_dice(stats, valid)[:, 0], [0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="valid_mask must have shape"):
        per_case_dice(stats, case_ids, [True, False])
    with pytest.raises(ValueError, match="case_ids must have shape"):
        per_case_dice(stats, ["a"], valid)


def test_summarize_groups_and_slice_nanmean():
    stats = _stats(
        [
            (1, 1, 1),  # A: Dice 1
            (0, 0, 9),  # A: Dice 0
            (2, 4, 4),  # B: Dice 0.5
            (0, 0, 0),  # C: empty slice (excluded from the slice mean); C's volume is empty
            (50, 50, 50),  # padding
        ]
    )
    case_ids = ["A", "A", "B", "C", "A"]
    valid = [True, True, True, True, False]
    groups = {"A": "h1", "B": "h1", "C": "h2"}
    out = summarize(stats, case_ids, valid, groups)

    assert out["case_ids"].tolist() == ["A", "B", "C"]
    case_dice = [2 / 11, 4 / 8, 1.0]  # C: empty volume -> 1.0 ("one")
    case_iou = [1 / 10, 2 / 6, 1.0]
    np.testing.assert_allclose(out["case_dice"][:, 0], case_dice)
    np.testing.assert_allclose(out["case_iou"][:, 0], case_iou)
    np.testing.assert_allclose(out["dice"], [sum(case_dice) / 3])
    np.testing.assert_allclose(out["iou"], [sum(case_iou) / 3])
    # Slice means over the three non-empty real slices only.
    np.testing.assert_allclose(out["slice_dice"], [(1.0 + 0.0 + 0.5) / 3])
    np.testing.assert_allclose(out["slice_iou"], [(1.0 + 0.0 + 1 / 3) / 3])
    assert list(out["groups"]) == ["h1", "h2"]
    np.testing.assert_allclose(out["groups"]["h1"]["dice"], [(2 / 11 + 0.5) / 2])
    np.testing.assert_allclose(out["groups"]["h1"]["iou"], [(0.1 + 1 / 3) / 2])
    assert out["groups"]["h1"]["num_cases"] == 2
    np.testing.assert_allclose(out["groups"]["h2"]["dice"], [1.0])
    assert out["groups"]["h2"]["num_cases"] == 1

    # empty_case="nan": the empty case C drops out of the case mean and its group is NaN.
    out_nan = summarize(stats, case_ids, valid, groups, empty_case="nan")
    np.testing.assert_allclose(out_nan["dice"], [(2 / 11 + 0.5) / 2])
    assert math.isnan(out_nan["groups"]["h2"]["dice"][0])
    # empty_slice="one": the empty slice now counts as 1.0.
    out_one = summarize(stats, case_ids, valid, empty_slice="one")
    np.testing.assert_allclose(out_one["slice_dice"], [(1.0 + 0.0 + 0.5 + 1.0) / 4])
    assert "groups" not in out_one

    with pytest.raises(ValueError, match=r"no group for cases \['C'\]"):
        summarize(stats, case_ids, valid, {"A": "h1", "B": "h1"})


def test_host_counts_shape_errors():
    with pytest.raises(ValueError, match=r"one shape \[N, C-1\]"):
        per_slice_dice({"inter": np.zeros((2, 1)), "pred": np.zeros((2, 2)), "true": np.zeros(2)})
    with pytest.raises(ValueError, match=r"one shape \[N, C-1\]"):
        per_slice_dice({"inter": 1, "pred": 1, "true": 1})


# ------------------------------------------------------------------------------------------
# Losses


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _random_problem(seed=0, shape=(3, 4, 5), num_classes=3, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((*shape, num_classes))).astype(np.float32)
    mask = rng.integers(0, num_classes, shape).astype(np.int32)
    return logits, mask


def test_pixel_cross_entropy_matches_numpy():
    logits, mask = _random_problem()
    logp = _np_log_softmax(logits)
    b, h, w = mask.shape
    ref = np.zeros(b)
    for i in range(b):
        ref[i] = -np.mean([logp[i, y, x, mask[i, y, x]] for y in range(h) for x in range(w)])
    out = pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(mask))
    assert out.shape == (b,)
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_weighted_cross_entropy_matches_hand_loop():
    logits, mask = _random_problem(seed=1)
    weights = (0.5, 2.0, 7.0)
    logp = _np_log_softmax(logits)
    b, h, w = mask.shape
    ref = np.zeros(b)
    for i in range(b):
        num = den = 0.0
        for y in range(h):
            for x in range(w):
                c = mask[i, y, x]
                num += weights[c] * -logp[i, y, x, c]
                den += weights[c]
        ref[i] = num / den
    out = pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(mask), weights)
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    # The weights matter: the weighted loss is not the plain mean here.
    plain = pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(mask))
    assert np.all(np.abs(np.asarray(out) - np.asarray(plain)) > 1e-3)


def test_weighted_cross_entropy_all_background_is_plain_mean():
    logits, _ = _random_problem(seed=2, num_classes=2)
    mask = np.zeros(logits.shape[:-1], np.int32)
    plain = pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(mask))
    weighted = pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(mask), (1.0, 524.46))
    np.testing.assert_allclose(weighted, plain, rtol=1e-6)
    np.testing.assert_allclose(plain, -_np_log_softmax(logits)[..., 0].mean(axis=(1, 2)), rtol=1e-5)


def test_cross_entropy_jits_with_weights():
    logits, mask = _random_problem(seed=3)
    fn = jax.jit(functools.partial(pixel_cross_entropy, class_weights=(1.0, 3.0, 9.0)))
    np.testing.assert_allclose(
        fn(jnp.asarray(logits), jnp.asarray(mask)),
        pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(mask), (1.0, 3.0, 9.0)),
        rtol=1e-6,
    )


def test_balanced_class_weights_inverse_frequency():
    masks = np.zeros((2, 2, 4), np.int32)  # 16 pixels: 12 x class 0, 3 x class 1, 1 x class 2
    masks[0, 0, :3] = 1
    masks[1, 1, 3] = 2
    w = balanced_class_weights(masks, 3)
    np.testing.assert_allclose(w, [1.0, 4.0, 12.0])
    assert w.dtype == np.float64
    # Every class carries the same total weight: w[c] * count[c] == count[0].
    np.testing.assert_allclose(w * np.bincount(masks.ravel(), minlength=3), [12.0] * 3)
    # PPPML-HMI's (1, 524.46) regime: one infection pixel in 525 (~0.19%) gets weight 524.
    sparse = np.zeros(525, np.int64)
    sparse[17] = 1
    np.testing.assert_allclose(balanced_class_weights(sparse, 2), [1.0, 524.0])
    with pytest.raises(ValueError, match=r"classes \[2\] never occur"):
        balanced_class_weights(np.array([0, 0, 1]), 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        balanced_class_weights(np.array([0, 1, 2]), 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        balanced_class_weights(np.array([0, 1, -1]), 2)


def _np_soft_dice_loss(logits, mask, eps, include_background=False):
    p = np.exp(_np_log_softmax(logits))
    c = logits.shape[-1]
    t = np.eye(c)[mask]
    inter = (p * t).sum(axis=(1, 2))
    dice = (2 * inter + eps) / (p.sum(axis=(1, 2)) + t.sum(axis=(1, 2)) + eps)
    if not include_background:
        dice = dice[:, 1:]
    return 1 - dice.mean(axis=-1)


@pytest.mark.parametrize("include_background", [False, True])
def test_soft_dice_loss_matches_numpy(include_background):
    logits, mask = _random_problem(seed=4)
    for eps in (1.0, 1e-3):
        out = soft_dice_loss(
            jnp.asarray(logits), jnp.asarray(mask), eps=eps, include_background=include_background
        )
        ref = _np_soft_dice_loss(logits, mask, eps, include_background)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_soft_dice_loss_perfect_and_fully_wrong():
    mask = np.zeros((2, 4, 4), np.int32)
    mask[0, 1:3, 1:3] = 1  # 4 foreground pixels
    mask[1, 0, :] = 1  # 4 foreground pixels
    perfect = soft_dice_loss(_one_hot_logits(mask, 2), jnp.asarray(mask))
    np.testing.assert_allclose(perfect, [0.0, 0.0], atol=1e-6)
    wrong = _one_hot_logits(1 - mask, 2)
    # I ~ 0, P + T = 12 + 4 = 16 pixels: Dice = (0 + eps) / (16 + eps).
    np.testing.assert_allclose(soft_dice_loss(wrong, jnp.asarray(mask)), [16 / 17] * 2, rtol=1e-5)
    np.testing.assert_allclose(
        soft_dice_loss(wrong, jnp.asarray(mask), eps=1e-6), [1.0, 1.0], atol=1e-6
    )
    # A class absent from truth and prediction costs nothing thanks to eps.
    empty = np.zeros((1, 4, 4), np.int32)
    np.testing.assert_allclose(
        soft_dice_loss(_one_hot_logits(empty, 2), jnp.asarray(empty)), [0.0], atol=1e-6
    )


def test_loss_shape_errors():
    logits = jnp.zeros((2, 4, 4, 3))
    good = jnp.zeros((2, 4, 4), jnp.int32)
    for fn in (pixel_cross_entropy, soft_dice_loss, segmentation_loss("ce+dice")):
        with pytest.raises(
            ValueError, match=r"expected logits \[B, H, W, C\] and mask \[B, H, W\]"
        ):
            fn(logits, jnp.zeros((2, 4, 5), jnp.int32))
        with pytest.raises(ValueError, match=r"got \(2, 4, 4\) and \(2, 4\)"):
            fn(logits[..., 0], good[..., 0])
    with pytest.raises(ValueError, match="class_weights must be 3 positive numbers"):
        pixel_cross_entropy(logits, good, (1.0, 2.0))
    with pytest.raises(ValueError, match="class_weights must be 3 positive numbers"):
        pixel_cross_entropy(logits, good, (1.0, 0.0, 2.0))
    with pytest.raises(ValueError, match="class_weights must be 3 positive numbers"):
        pixel_cross_entropy(logits, good, 1.0)
    with pytest.raises(ValueError, match="needs C >= 2"):
        soft_dice_loss(logits[..., :1], good)
    with pytest.raises(ValueError, match="unknown segmentation loss 'bce'"):
        segmentation_loss("bce")
    with pytest.raises(ValueError, match="kind='dice' has none"):
        segmentation_loss("dice", class_weights=(1.0, 2.0))


def test_dice_stats_shape_errors():
    with pytest.raises(ValueError, match=r"got \(2, 4, 4, 3\) and \(1, 4, 4\)"):
        # Would otherwise broadcast the single mask over the batch.
        dice_stats(jnp.zeros((2, 4, 4, 3)), jnp.zeros((1, 4, 4), jnp.int32), 3)
    with pytest.raises(ValueError, match="expected logits"):
        dice_stats(jnp.zeros((2, 4, 5), jnp.int32), jnp.zeros((2, 4, 4), jnp.int32), 3)


def test_segmentation_loss_is_sum_of_parts():
    logits, mask = _random_problem(seed=5)
    lg, m = jnp.asarray(logits), jnp.asarray(mask)
    w = (1.0, 5.0, 2.0)
    ce = pixel_cross_entropy(lg, m)
    ce_w = pixel_cross_entropy(lg, m, w)
    dice = soft_dice_loss(lg, m)
    np.testing.assert_allclose(segmentation_loss("ce")(lg, m), ce, rtol=1e-6)
    np.testing.assert_allclose(segmentation_loss("dice")(lg, m), dice, rtol=1e-6)
    np.testing.assert_allclose(segmentation_loss("ce+dice")(lg, m), ce + dice, rtol=1e-6)
    np.testing.assert_allclose(segmentation_loss("ce+dice", w)(lg, m), ce_w + dice, rtol=1e-6)
    np.testing.assert_allclose(
        segmentation_loss("ce+dice", dice_eps=1e-3)(lg, m),
        ce + soft_dice_loss(lg, m, eps=1e-3),
        rtol=1e-6,
    )
    # Independent check of the sum against the numpy references.
    logp = _np_log_softmax(logits)
    ref_ce = -np.take_along_axis(logp, mask[..., None], axis=-1)[..., 0].mean(axis=(1, 2))
    np.testing.assert_allclose(
        jax.jit(segmentation_loss("ce+dice"))(lg, m),
        ref_ce + _np_soft_dice_loss(logits, mask, 1.0),
        rtol=1e-5,
    )


# ------------------------------------------------------------------------------------------
# dice_stats on device


def test_dice_stats_jit_matches_numpy_counts():
    rng = np.random.default_rng(6)
    num_classes = 4
    logits = rng.standard_normal((5, 8, 6, num_classes)).astype(np.float32)
    mask = rng.integers(0, num_classes, (5, 8, 6)).astype(np.int32)
    pred = logits.argmax(-1)
    ref = {k: np.zeros((5, num_classes - 1), np.int64) for k in ("inter", "pred", "true")}
    for b in range(5):
        for c in range(1, num_classes):
            ref["inter"][b, c - 1] = np.sum((pred[b] == c) & (mask[b] == c))
            ref["pred"][b, c - 1] = np.sum(pred[b] == c)
            ref["true"][b, c - 1] = np.sum(mask[b] == c)
    jitted = jax.jit(dice_stats, static_argnums=2)
    for inp in (logits, pred.astype(np.int32)):
        out = jitted(jnp.asarray(inp), jnp.asarray(mask), num_classes)
        assert set(out) == {"inter", "pred", "true"}
        for k in ref:
            assert out[k].dtype == jnp.int32
            assert out[k].shape == (5, num_classes - 1)
            np.testing.assert_array_equal(out[k], ref[k])


@pytest.mark.parametrize("kind", ["ce", "dice", "ce+dice"])
def test_a_one_hot_soft_mask_gives_the_integer_masks_loss_and_a_gradient(kind):
    """Gradient inversion optimizes soft masks: one-hot ones must score exactly like labels,
    class weights included, and the loss must be differentiable in the mask."""
    logits, mask = _random_problem(seed=4)
    logits, mask = jnp.asarray(logits), jnp.asarray(mask)
    weights = None if kind == "dice" else (1.0, 3.0, 7.0)[: logits.shape[-1]]
    fn = segmentation_loss(kind, weights)
    soft = jax.nn.one_hot(mask, logits.shape[-1])
    np.testing.assert_allclose(fn(logits, soft), fn(logits, mask), rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda t: fn(logits, t).sum())(soft)
    assert grad.shape == soft.shape and float(jnp.abs(grad).sum()) > 0
