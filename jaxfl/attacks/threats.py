"""Threat models at the aggregation boundary: invert what jaxfl's pipeline really sends.

The observation is taken from the :class:`jaxfl.simulate.Simulator` of the run's own config:

- ``client_update``: one client's update as it leaves the client (:meth:`client_outputs`:
  local training, clipping and local DP noise included). An unprotected server sees it; with
  secure aggregation nobody does, so that pairing is refused.
- ``aggregate``: the mean update the round applies (:meth:`released_update`: the SecAgg+ or
  CKKS output, or the plain / central-DP aggregate of every client), attacked as if it were the
  target client's own update.

The attacker is white-box and honest-but-curious: it knows the model, the broadcast weights, the
client's training procedure (optimizer, steps, batch, its key when runs are seeded) but not the
DP noise. Its forward model is the algorithm's own ``client_update`` with the noise switched off
(:func:`pipeline_update_fn`), so a multi-step FedAvg delta is matched exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxfl import factories
from jaxfl.attacks.audit import without_noise
from jaxfl.attacks.inversion import AttackConfig, invert, match_reconstructions, recover_labels
from jaxfl.simulate import client_key
from jaxfl.tasks.seg_ops import IGNORE_LABEL, dice_from_counts, dice_stats
from jaxfl.types import ClientArrays, ClientData, FederatedData

THREATS = ("client_update", "aggregate")


def first_examples(train: ClientArrays, n: int) -> ClientArrays:
    """Every client keeping only its first ``n`` real examples (the attacked batch)."""
    if n < 1 or n > train.mask.shape[1]:
        raise ValueError(f"attack batch {n} must be in [1, {train.mask.shape[1]}]")
    examples = {k: np.asarray(v)[:, :n] for k, v in train.examples.items()}
    counts = np.minimum(np.asarray(train.counts), n)
    if np.any(counts < n):
        raise ValueError(f"every client needs at least {n} training examples for the attack")
    return ClientArrays(examples, np.asarray(train.mask)[:, :n], counts)


def pipeline_update_fn(algorithm, task, key: jax.Array):
    """The attacker's replica of one client: ``(params, images [B, ...], soft targets) -> the
    update pytree`` that ``algorithm.client_update`` sends for that batch with ``key``.

    The soft targets are class probabilities in the shape of the task's target plus a class
    axis (labels ``[B, C]``, masks ``[B, H, W, C]``); the task's loss takes them as they are, so
    DLG can optimize them, and one-hot targets give exactly the integer targets' update.
    """

    def update(params, images, soft_targets):
        n = images.shape[0]
        examples = {task.input_key: images, task.target_key: soft_targets}
        data = ClientData(examples, jnp.ones(n, jnp.float32), np.int32(n))  # static count
        return algorithm.client_update(params, data, key).update

    return update


def real_examples(train: ClientArrays, values: np.ndarray) -> np.ndarray:
    """Every client's real examples of ``values [K, N, ...]``, pooled: ``[sum(counts), ...]``."""
    values = np.asarray(values)
    return np.concatenate([values[c, :n] for c, n in enumerate(np.asarray(train.counts))])


def data_range(images: np.ndarray) -> tuple[float, float]:
    """Where the data live: [-1, 1] (MedMNIST's normalization) or [0, 1]."""
    return (-1.0, 1.0) if float(np.min(images)) < -1e-3 else (0.0, 1.0)


def invert_round(
    config: ml_collections.ConfigDict,
    fed: FederatedData,
    threat: str,
    attack: AttackConfig,
    *,
    batch: int = 1,
    target: int = 0,
    seed: int = 0,
    broken: bool = False,
) -> dict[str, Any]:
    """Reconstruct ``target``'s first ``batch`` training images from what ``threat`` sees in
    round 0 of ``config`` (every client holding ``batch`` examples).

    Returns the ``originals`` and the matched ``reconstructions`` ``[B, ...]``, ``psnr`` and
    ``ssim`` (means over the batch), ``label_accuracy`` (iDLG's sign-recovered label for batch
    1, DLG's reconstructed one, the known labels otherwise; for segmentation the fraction of
    labelled pixels the reconstructed mask gets right, with its foreground ``mask_dice`` and
    ``original_masks`` / ``reconstructed_masks``), ``mean_image_psnr`` (the mean of every
    client's training images as a guess: what an attacker gets for free) and the gradient
    ``observed_norm``. ``broken``: the clients' DP noise is switched off (the broken-DP
    control). Segmentation needs ``attack.method`` ``"dlg"`` or ``"inverting"``: the mask is
    reconstructed too.
    """
    if threat not in THREATS:
        raise ValueError(f"threat={threat!r}; choose one of {THREATS}")
    secure = config.secure.aggregator != "plain"
    if threat == "client_update" and secure:
        raise ValueError(
            f"secure.aggregator={config.secure.aggregator!r}: no single client's update leaves "
            "the secure aggregation; attack threat='aggregate'"
        )
    segmentation = config.task.name == "segmentation"
    if segmentation and attack.method == "idlg":
        raise ValueError(
            "iDLG reads one label per image off the output layer, and a segmentation mask has "
            "one per pixel: use attack.method='dlg' or 'inverting', which reconstruct the mask "
            "with the image"
        )
    everyone = fed.train
    train = first_examples(fed.train, batch)
    fed = fed._replace(train=train)
    sim = factories.build_simulation(config, fed)
    plan = sim.privacy
    # The attacker's replica: the same client function without noise. DP-SGD's
    # Poisson-sampled, clipped steps are not differentiable (a data-dependent loop): against
    # record-level DP the attacker replicates plain local training instead.
    quiet = factories.build_simulation(
        config,
        fed,
        privacy=without_noise(plan) if plan.dp_sgd is None else plan._replace(dp_sgd=None),
    )
    if broken:  # the clients send without noise: the replica's plan, unless DP-SGD's
        sim = (
            quiet
            if plan.dp_sgd is None
            else factories.build_simulation(config, fed, privacy=without_noise(plan))
        )
    state = sim.runner.init(sim.params)
    if threat == "client_update":
        out = sim.runner.client_outputs(state, 0)
        flat = out["updates"][list(out["clients"]).index(target)]
    else:
        flat = sim.runner.released_update(state, 0)
    broadcast = sim.algorithm.broadcast(state)
    observed = ravel_pytree(broadcast)[1](jnp.asarray(flat, jnp.float32))
    key = client_key(sim.runner.client_stream, jnp.int32(0), jnp.int32(target))
    replica = pipeline_update_fn(quiet.algorithm, sim.task, key)
    images = np.asarray(train.examples[sim.task.input_key][target])
    targets = np.asarray(train.examples[sim.task.target_key][target]).astype(np.int32)
    if segmentation or attack.method == "dlg":
        guess = None  # the targets are reconstructed with the images
    elif batch == 1 and "head" in observed:
        # An update is -lr x the gradient (summed over steps): the label's bias entry is
        # positive, so the gradient's sign rule reads it off the negated update.
        head = observed["head"]
        guess = np.asarray(recover_labels(-head["kernel"], -head["bias"]))
    else:
        guess = targets
    population = real_examples(everyone, everyone.examples[sim.task.input_key])
    value_range = data_range(population)
    attack = dataclasses.replace(attack, value_range=value_range)
    result = invert(
        replica,
        broadcast,
        observed,
        jax.random.key(seed),
        images.shape,
        fed.num_classes,
        attack,
        None if guess is None else jnp.asarray(guess),
        label_shape=targets.shape,
    )
    matched = match_reconstructions(jnp.asarray(images), result["images"], value_range)
    index = np.asarray(matched["index"])
    recon = np.asarray(result["images"])[index]
    if guess is None:
        recovered = np.asarray(jnp.argmax(result["label_probs"], axis=-1))[index]
    else:
        recovered = guess
    mean = np.broadcast_to(population.mean(axis=0), images.shape)
    mean_psnr = match_reconstructions(jnp.asarray(images), jnp.asarray(mean), value_range)
    out = {
        "originals": images,
        "reconstructions": recon,
        "psnr": float(np.mean(matched["psnr"])),
        "ssim": float(np.mean(matched["ssim"])),
        "mean_image_psnr": float(np.mean(mean_psnr["psnr"])),
        "observed_norm": float(np.linalg.norm(flat)),
        "clients_aggregated": int(fed.train.num_clients) if threat == "aggregate" else 1,
    }
    if segmentation:
        out.update(_mask_scores(targets, recovered, fed.num_classes))
        out["original_masks"] = targets
        out["reconstructed_masks"] = recovered
    else:
        out["label_accuracy"] = float(np.mean(recovered == targets))
    return out


def _mask_scores(true: np.ndarray, recovered: np.ndarray, num_classes: int) -> dict[str, float]:
    """``label_accuracy``: the fraction of labelled pixels whose class the reconstructed mask
    gets right; ``mask_dice``: the foreground Dice of the reconstructed masks, pooled."""
    labelled = true != IGNORE_LABEL
    counts = dice_stats(jnp.asarray(recovered), jnp.asarray(true), num_classes)
    pooled = {k: np.asarray(v).sum(axis=0) for k, v in counts.items()}
    dice = dice_from_counts(pooled["inter"], pooled["pred"], pooled["true"])
    return {
        "label_accuracy": float(np.mean(recovered[labelled] == true[labelled])),
        "mask_dice": float(np.mean(dice)),
    }
