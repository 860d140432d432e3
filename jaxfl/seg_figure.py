"""The segmentation figure of a finished run: per hospital, a held-out CT slice with ground-truth
and predicted contours, and the hospitals' Dice per round.

The model each hospital would use is drawn: the global model (FedAvg, ...), adapted on the
hospital's own training slices exactly as the run's personalized evaluation did in its last
round (when ``personalization.enabled``), or the hospital's own model (``algorithm = local``).
Everything is rebuilt from the workdir's ``config.json`` and its newest checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from jaxfl import factories
from jaxfl.checkpoint import Checkpointer
from jaxfl.errors import UserError
from jaxfl.personalize import adapt_params
from jaxfl.plotting import load_metrics, series
from jaxfl.privacy.plan import plan_privacy
from jaxfl.simulate import INIT_STREAM, PERSONALIZE_STREAM, client_key, num_sampled_clients
from jaxfl.tasks import make_loss
from jaxfl.tasks.seg_ops import IGNORE_LABEL, dice_from_counts, dice_stats


def load_run_config(workdir: Path) -> ml_collections.ConfigDict:
    """The config a run wrote to ``workdir/config.json``."""
    path = workdir / "config.json"
    if not path.is_file():
        raise UserError(f"{workdir} has no config.json; pass the --workdir of a finished run.")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _restore(config, workdir: Path, fed, task, model):
    """The runner and the newest checkpoint's state of the run in ``workdir``."""
    sampling = factories.clients_per_round(config)
    privacy = plan_privacy(
        config,
        np.asarray(fed.train.counts),
        num_sampled_clients(sampling, config.num_clients),
        poisson_rate=factories.poisson_rate(config),
    )
    runner, _ = factories.build_runner(
        config, task, model, fed.train, privacy, sampling, factories.poisson_rate(config)
    )
    key = jax.random.fold_in(jax.random.key(config.seed), INIT_STREAM)
    state = runner.init(factories.init_params(model, fed.train.examples["image"][0], key))
    checkpointer = Checkpointer(workdir, every=0)
    try:
        if checkpointer.latest_round() == 0:
            raise UserError(f"{workdir} has no checkpoint: the run has not finished a round.")
        return runner, checkpointer.restore(state), checkpointer.latest_round()
    finally:
        checkpointer.close()


def hospital_params(config, workdir: Path) -> tuple[Any, Any, list[Any], list[str], int]:
    """``(fed, model, [params of hospital k], [how they were obtained], rounds done)``."""
    fed = factories.build_segmentation_data(config)
    task = factories.build_task(config, fed)
    model = factories.build_model(config, fed.num_classes)
    runner, state, rounds = _restore(config, workdir, fed, task, model)
    k = fed.train.num_clients
    if config.algorithm.name == "local":
        own = [jax.tree.map(lambda x, c=c: x[c], state.params) for c in range(k)]
        return fed, model, own, ["own model"] * k, rounds
    p = config.personalization
    if not p.enabled or p.adapt_steps == 0:
        return fed, model, [state.params] * k, ["global model"] * k, rounds
    loss = make_loss(task, model.apply)
    stream = jax.random.fold_in(jax.random.key(config.seed), PERSONALIZE_STREAM)
    adapted = [
        adapt_params(
            loss,
            state.params,
            jax.tree.map(jnp.asarray, fed.train.client(c)),
            client_key(stream, jnp.int32(rounds - 1), jnp.int32(c)),
            steps=p.adapt_steps,
            lr=p.adapt_lr,
            batch_size=config.local.batch_size,
        )
        for c in range(k)
    ]
    return fed, model, adapted, [f"adapted ({p.adapt_steps} steps)"] * k, rounds


def _showcase_slice(heldout, c: int) -> int:
    """Index of client ``c``'s held-out slice with the most foreground (its first if none)."""
    real = np.flatnonzero(np.asarray(heldout.mask[c]) > 0)
    if not real.size:
        return -1
    fg = (np.asarray(heldout.examples["mask"][c])[real] > 0).sum(axis=(1, 2))
    return int(real[np.argmax(fg)])


def plot_segmentation(workdir: str | Path, out: str | Path, title: str | None = None) -> Path:
    """Draw the figure of the segmentation run in ``workdir`` into the PNG ``out``."""
    workdir = Path(workdir)
    config = load_run_config(workdir)
    if config.task.name != "segmentation":
        raise UserError(f"{workdir} is a {config.task.name} run; this figure is for segmentation.")
    rows = load_metrics(workdir)
    fed, model, params, how, rounds = hospital_params(config, workdir)
    k = fed.train.num_clients
    cols = min(k, 5)
    grid = math.ceil(k / cols)
    fig = Figure(figsize=(3.0 * cols, 3.2 * grid + 3.4), layout="constrained")
    sub = fig.subfigures(2, 1, height_ratios=[3.2 * grid, 3.4])
    axes = np.atleast_1d(sub[0].subplots(grid, cols, squeeze=False)).ravel()
    sites = [f"hospital {c}" for c in range(k)]
    for c, ax in enumerate(axes):
        ax.set_axis_off()
        if c >= k:
            continue
        i = _showcase_slice(fed.heldout, c)
        if i < 0:
            ax.set_title(f"{sites[c]}: no held-out slice", fontsize=9)
            continue
        image = np.asarray(fed.heldout.examples["image"][c, i, ..., 0])
        truth = np.asarray(fed.heldout.examples["mask"][c, i])
        logits = model.apply({"params": params[c]}, jnp.asarray(image)[None, ..., None])
        pred = np.asarray(jnp.argmax(logits[0], -1))
        labelled = truth != IGNORE_LABEL
        counts = dice_stats(jnp.asarray(pred)[None], jnp.asarray(truth)[None], fed.num_classes)
        dice = float(dice_from_counts(*(np.sum(counts[k]) for k in ("inter", "pred", "true"))))
        ax.imshow(image, cmap="gray", vmin=-1, vmax=1)
        if (truth > 0).any():
            ax.contour(truth > 0, levels=[0.5], colors="lime", linewidths=1.2)
        if ((pred > 0) & labelled).any():
            ax.contour((pred > 0) & labelled, levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(f"{sites[c]}: slice Dice {dice:.2f}\n{how[c]}", fontsize=9)
    axes[0].legend(
        handles=[
            Line2D([], [], color="lime", label="ground truth"),
            Line2D([], [], color="red", label="prediction"),
        ],
        loc="lower left",
        fontsize="x-small",
    )
    curve = sub[1].subplots(1, 1)
    for key, style in (("heldout_dice", "-"), ("personalized_dice", "--")):
        per_round = [(r["round"], r[key]) for r in rows if isinstance(r.get(key), list)]
        for c in range(k):
            xs = [x for x, v in per_round if v[c] is not None]
            ys = [v[c] for _, v in per_round if v[c] is not None]
            if xs:
                label = (
                    sites[c] if style == "-" or not any("heldout_dice" in r for r in rows) else None
                )
                curve.plot(xs, ys, ls=style, color=f"C{c % 10}", marker="o", ms=2, label=label)
    curve.plot(*series(rows, "test_dice"), color="k", lw=2, label="test split (all hospitals)")
    curve.set(
        xlabel="round",
        ylabel="Dice (per case)",
        ylim=(0, 1),
        title="Held-out Dice per hospital (solid: global model, dashed: personalized)",
    )
    curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    curve.grid(True, alpha=0.3)
    curve.legend(fontsize="x-small", ncol=min(k + 1, 6))
    fig.suptitle(
        title or f"{config.data.name}: {config.algorithm.name}, {rounds} rounds", fontsize=11
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
