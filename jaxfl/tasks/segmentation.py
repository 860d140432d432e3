"""Semantic segmentation of 2D slices: ``{"image": [N, H, W, C], "mask": [N, H, W] int,
"case": [N] int}``, per-pixel logits ``[N, H, W, classes]`` out.

``mask`` holds class labels (0 = background) and :data:`IGNORE_LABEL` on pixels that carry no
label, e.g. the padding that brings a slice to a size the U-Net accepts: they add nothing to
the loss or to any count. ``case`` names the volume (patient) each slice comes from, so Dice and
IoU are computed per case over all its slices (:mod:`jaxfl.tasks.seg_ops` states the empty-mask
conventions). The primary metric is ``dice``: the mean over cases of the foreground classes'
mean volume-level Dice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxfl.tasks import seg_ops
from jaxfl.tasks.base import Task
from jaxfl.types import Batch

IGNORE_LABEL = seg_ops.IGNORE_LABEL
LOSSES = ("ce", "dice", "ce+dice")


@dataclasses.dataclass(frozen=True)
class Segmentation(Task):
    """Pixel-wise loss (``loss``: class-balanced CE, soft Dice or their sum); Dice/IoU metrics.

    ``num_classes`` counts the background; ``class_weights`` (one per class) weight the
    cross-entropy, PPPML-HMI's class-balanced form (see :func:`seg_ops.pixel_cross_entropy`).
    """

    name: str = "segmentation"
    target_key: str = "mask"
    required: tuple[str, ...] = ("image", "mask", "case")
    primary: str = "dice"
    headline: tuple[str, ...] = ("dice",)
    num_classes: int = 2
    loss: str = "ce+dice"
    class_weights: tuple[float, ...] | None = None
    dice_eps: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"segmentation loss {self.loss!r}; choose one of {LOSSES}")
        if self.num_classes < 2:
            raise ValueError(
                f"segmentation needs num_classes >= 2 (background + foreground), got "
                f"{self.num_classes}"
            )
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
        # Validates class_weights against the loss kind once, not at trace time.
        seg_ops.segmentation_loss(self.loss, self.class_weights, dice_eps=self.dice_eps)

    def example_losses(self, outputs: jax.Array, batch: Batch) -> jax.Array:
        """The configured per-example pixel loss ``[B]`` of ``logits [B, H, W, C]`` (against an
        integer mask, or a soft one ``[B, H, W, C]``)."""
        fn = seg_ops.segmentation_loss(self.loss, self.class_weights, dice_eps=self.dice_eps)
        return fn(outputs, batch["mask"])

    def example_metrics(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        """Foreground pixel counts per example ``[B]`` (summed over classes), for train Dice."""
        counts = seg_ops.dice_stats(outputs, _hard(batch["mask"]), self.num_classes)
        return {f"dice_{k}": v.sum(-1).astype(jnp.float32) for k, v in counts.items()}

    def train_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """``train_loss`` and ``train_dice``: Dice over every training pixel seen (pooled)."""
        out = super().train_metrics(sums)
        if "dice_inter" in sums:
            dice = seg_ops.dice_from_counts(
                sums["dice_inter"], sums["dice_pred"], sums["dice_true"]
            )
            out["train_dice"] = float(dice)
        return out

    def eval_stats(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        """Per-slice counts ``inter``/``pred``/``true`` ``[B, C-1]`` and the loss ``[B]``."""
        counts = seg_ops.dice_stats(outputs, batch["mask"], self.num_classes)
        return {**counts, "loss": self.example_losses(outputs, batch)}

    def _summary(self, stats: Mapping[str, np.ndarray], examples: Batch, valid) -> dict:
        s = seg_ops.summarize(stats, np.asarray(examples["case"]), valid)
        out = {
            "dice": float(np.nanmean(s["dice"])),
            "iou": float(np.nanmean(s["iou"])),
            "slice_dice": float(seg_ops.nanmean(s["slice_dice"])),
            "slice_iou": float(seg_ops.nanmean(s["slice_iou"])),
        }
        if self.num_classes > 2:
            out.update({f"dice_class{c + 1}": float(d) for c, d in enumerate(s["dice"])})
        return out

    def evaluate(self, stats: Mapping[str, np.ndarray], examples: Batch) -> dict[str, float]:
        """Case-level Dice and IoU (mean over cases), slice-level means, and the mean loss."""
        return {**self._summary(stats, examples, None), "loss": float(np.mean(stats["loss"]))}

    def client_metrics(
        self, stats: Mapping[str, np.ndarray], examples: Batch, valid: np.ndarray
    ) -> dict[str, float]:
        """Case-level Dice and IoU of one client's held-out slices (NaN without any)."""
        if not np.any(valid):
            return {"dice": float("nan"), "iou": float("nan")}
        s = self._summary(stats, examples, valid)
        return {"dice": s["dice"], "iou": s["iou"]}

    def check(self, examples: Batch, num_classes: int, where: str) -> None:
        """Masks must be integer ``[N, H, W]`` labels in ``[0, num_classes)`` (or ignored)."""
        super().check(examples, num_classes, where)
        image, mask = np.asarray(examples["image"]), np.asarray(examples["mask"])
        if not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(f"{where}: masks must be integer labels, got dtype {mask.dtype}.")
        if mask.shape != image.shape[:-1]:
            raise ValueError(
                f"{where}: masks {mask.shape} must be the images {image.shape} without their "
                "channel axis (one label per pixel)."
            )
        labelled = mask[mask != IGNORE_LABEL]
        if labelled.size and (labelled.min() < 0 or labelled.max() >= num_classes):
            raise ValueError(
                f"{where}: mask labels span [{labelled.min()}, {labelled.max()}] but the task has "
                f"{num_classes} classes; remap labels (CTPreprocess.label_map) or raise "
                "config.task.num_classes."
            )


def _hard(mask: jax.Array) -> jax.Array:
    """An integer mask ``[B, H, W]`` (a soft one's argmax)."""
    return jnp.argmax(mask, axis=-1) if mask.ndim == 4 else mask
