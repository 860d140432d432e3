"""The privacy audit of one config against every protection: "How private is it?".

For each protection of ``config.attack.protections`` the suite runs, on the config's own data,
model and training:

1. gradient inversion of what the protection lets the server see in round 0
   (:func:`jaxfl.attacks.threats.invert_round`; every client holding ``attack.batch`` images);
2. membership inference on the model trained for ``attack.mia_rounds`` rounds: the loss
   threshold on the global model, and on each client's personalized model (one adaptation from
   the global one) the loss threshold and the shadow-free likelihood ratio with the other
   clients' personalized models as references; members are the clients' training examples,
   non-members as many test examples (for a personalized model its own client's held-out
   examples when every client has some: the same site and scanner as its members);
3. for DP protections, the accountant's epsilon (the whole run, and one round) and the
   empirical lower bound of one round (:func:`jaxfl.attacks.audit.audit_dp`); the
   ``broken_dp`` row switches the noise off while claiming the same epsilon.

Rows go to ``results.json`` and ``results.md``; originals above one row of reconstructions
per protection to ``reconstructions.png``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from jaxfl import factories
from jaxfl.attacks.audit import audit_dp
from jaxfl.attacks.inversion import AttackConfig
from jaxfl.attacks.membership import (
    attack_summary,
    example_statistics,
    likelihood_ratio_scores,
    loss_threshold_scores,
    statistics_fn,
)
from jaxfl.attacks.threats import data_range, invert_round, real_examples
from jaxfl.personalize import adapt_params
from jaxfl.simulate import client_rows
from jaxfl.tasks import make_loss
from jaxfl.types import FederatedData

# protection -> (dp.mode, secure.aggregator, what the attacker sees)
PROTECTIONS = {
    "none": ("none", "plain", "client_update"),
    "none_aggregate": ("none", "plain", "aggregate"),
    "record_dp": ("record", "plain", "client_update"),
    "local_update_dp": ("local_update", "plain", "client_update"),
    "user_level_dp": ("user_level", "plain", "aggregate"),
    "secagg": ("none", "secagg", "aggregate"),
    "ckks": ("none", "ckks", "aggregate"),
    "broken_dp": ("local_update", "plain", "client_update"),
}

COLUMNS = (
    ("protection", "protection", "{}"),
    ("threat", "server sees", "{}"),
    ("psnr", "PSNR dB", "{:.1f}"),
    ("ssim", "SSIM", "{:.3f}"),
    ("label_accuracy", "label acc", "{:.2f}"),
    ("mask_dice", "mask Dice", "{:.2f}"),
    ("mean_image_psnr", "mean-image PSNR", "{:.1f}"),
    ("mia_auc_global", "MIA AUC global", "{:.3f}"),
    ("mia_auc_personalized", "MIA AUC pers.", "{:.3f}"),
    ("lira_auc_personalized", "LiRA AUC pers.", "{:.3f}"),
    ("lira_tpr_at_1pct_fpr", "LiRA TPR@1%", "{:.3f}"),
    ("epsilon_accountant", "eps run", "{:.2f}"),
    ("epsilon_round", "eps round", "{:.2f}"),
    ("epsilon_empirical", "eps empirical", "{:.2f}"),
)


def protected_config(config: ml_collections.ConfigDict, protection: str):
    """``config`` with ``protection``'s DP mode and aggregator (and the attack's DP settings)."""
    if protection not in PROTECTIONS:
        raise ValueError(f"attack protection {protection!r}; choose from {sorted(PROTECTIONS)}")
    mode, aggregator, _ = PROTECTIONS[protection]
    c = ml_collections.ConfigDict(config.to_dict())
    c.dp.mode = mode
    c.secure.aggregator = aggregator
    c.dp.noise_multiplier = config.attack.noise_multiplier
    c.dp.clip_norm = config.attack.clip_norm
    c.dp.target_epsilon = 0.0
    return c


def attack_config(config: ml_collections.ConfigDict) -> AttackConfig:
    """The inversion settings of ``config.attack``."""
    a = config.attack
    return AttackConfig(
        method=a.method,
        steps=a.steps,
        learning_rate=a.learning_rate,
        tv_weight=a.tv_weight,
        restarts=a.restarts,
    )


def _train(config: ml_collections.ConfigDict, fed: FederatedData):
    """The global params after ``attack.mia_rounds`` rounds, and the built simulation."""
    sim = factories.build_simulation(config, fed)
    state = sim.runner.init(sim.params)
    for r in range(config.attack.mia_rounds):
        state, _ = sim.runner.run_round(state, r)
    return state.params, sim


def membership(config: ml_collections.ConfigDict, fed: FederatedData) -> dict[str, float]:
    """Membership inference on the global model and on the clients' personalized models
    (nothing without test examples: they are the non-members)."""
    if len(next(iter(fed.test.values()))) == 0:
        logging.warning("No test examples to serve as non-members: no membership inference.")
        return {}
    params, sim = _train(config, fed)
    apply_fn, key = sim.model.apply, sim.task.input_key
    stats = statistics_fn(apply_fn)
    train = fed.train
    counts = np.asarray(train.counts)
    images = np.asarray(train.examples[key])
    labels = np.asarray(train.examples[sim.task.target_key])
    members_x, members_y = real_examples(train, images), real_examples(train, labels)
    test = fed.test
    test_y = np.asarray(test[sim.task.target_key])
    size = min(len(members_y), len(test_y))
    rng = np.random.default_rng(config.seed)
    pick = rng.choice(len(test_y), size, replace=False)
    non_x, non_y = np.asarray(test[key])[pick], test_y[pick]
    member = example_statistics(stats, params, members_x[:size], members_y[:size])
    non = example_statistics(stats, params, non_x, non_y)
    out = {
        "mia_auc_global": attack_summary(
            loss_threshold_scores(member["loss"]), loss_threshold_scores(non["loss"])
        )["auc"]
    }
    # Personalized: each client adapts from the global model on its own data.
    p = config.personalization
    loss_fn = make_loss(sim.task, apply_fn)
    rows = client_rows(train)
    personal = [
        adapt_params(
            loss_fn,
            params,
            jax.tree.map(lambda a, c=c: jnp.asarray(a[c]), rows),
            jax.random.key(c),
            steps=p.adapt_steps,
            lr=p.adapt_lr,
            batch_size=config.local.batch_size,
        )
        for c in range(train.num_clients)
    ]
    per = min(int(counts.min()), size)
    # A personalized model's non-members come from its own site when every client holds
    # held-out examples: test examples from other sites would let the attack detect the site
    # (its scanner), not membership.
    held = fed.heldout
    own = int(np.min(held.counts)) > 0
    if own:
        per = min(per, int(np.min(held.counts)))
        held_x = np.asarray(held.examples[key])
        held_y = np.asarray(held.examples[sim.task.target_key])
    losses, liras = [], []
    for c, model_c in enumerate(personal):
        mx, my = images[c, :per], labels[c, :per]
        nx, ny = (held_x[c, :per], held_y[c, :per]) if own else (non_x[:per], non_y[:per])
        m_stats = example_statistics(stats, model_c, mx, my)
        n_stats = example_statistics(stats, model_c, nx, ny)
        losses.append(
            attack_summary(
                loss_threshold_scores(m_stats["loss"]), loss_threshold_scores(n_stats["loss"])
            )
        )
        others = [q for j, q in enumerate(personal) if j != c]
        ref_m = np.stack([example_statistics(stats, q, mx, my)["phi"] for q in others])
        ref_n = np.stack([example_statistics(stats, q, nx, ny)["phi"] for q in others])
        liras.append(
            attack_summary(
                likelihood_ratio_scores(m_stats["phi"], ref_m),
                likelihood_ratio_scores(n_stats["phi"], ref_n),
            )
        )
    out["mia_nonmembers_personalized"] = "heldout" if own else "test"
    out["mia_auc_personalized"] = float(np.mean([s["auc"] for s in losses]))
    out["lira_auc_personalized"] = float(np.mean([s["auc"] for s in liras]))
    out["lira_tpr_at_1pct_fpr"] = float(np.mean([s["tpr_at_1pct_fpr"] for s in liras]))
    if sim.privacy.epsilons_for is not None:
        ledger = [sim.privacy.noise_multiplier] * config.attack.mia_rounds
        out["epsilon_accountant"] = float(np.max(sim.privacy.epsilons_for(ledger)))
    return out


def run_suite(config: ml_collections.ConfigDict, fed: FederatedData, workdir: Path) -> list[dict]:
    """Every protection's row (see the module docstring), written to ``workdir`` as they come
    (a killed suite keeps the rows it finished); returns the rows."""
    workdir.mkdir(parents=True, exist_ok=True)
    attack = attack_config(config)
    rows, figures = [], []
    for protection in config.attack.protections:
        start = time.perf_counter()
        c = protected_config(config, protection)
        threat = PROTECTIONS[protection][2]
        broken = protection == "broken_dp"
        row: dict[str, Any] = {"protection": protection, "threat": threat}
        inverted = invert_round(
            c, fed, threat, attack, batch=config.attack.batch, seed=config.seed, broken=broken
        )
        originals = inverted.pop("originals"), inverted.pop("original_masks", None)
        figures.append(
            (protection, inverted.pop("reconstructions"), inverted.pop("reconstructed_masks", None))
        )
        row.update(inverted)
        if not broken:
            row.update(membership(c, fed))
        if c.dp.mode != "none":
            audit = audit_dp(c, fed, trials=config.attack.audit_trials, broken=broken)
            row["epsilon_round"] = audit["epsilon_claimed"]
            row["epsilon_empirical"] = audit["epsilon_empirical"]
            row["audit"] = audit
        row["seconds"] = time.perf_counter() - start
        logging.info("attack suite: %s", {k: v for k, v in row.items() if k != "audit"})
        rows.append(row)
        write_results(rows, workdir)
    plot_reconstructions(originals, figures, workdir / "reconstructions.png")
    return rows


def write_results(rows: list[dict], workdir: Path) -> None:
    """``results.json`` (every field) and ``results.md`` (the table)."""
    (workdir / "results.json").write_text(json.dumps(rows, indent=2, default=float) + "\n")
    (workdir / "results.md").write_text(markdown_table(rows))


def markdown_table(rows: list[dict]) -> str:
    """The README's table of ``rows`` ("-" where a column does not apply)."""
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    for row in rows:
        cells = [fmt.format(row[k]) if k in row else "-" for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _show(image: np.ndarray) -> np.ndarray:
    """A displayable 2D image: a volume's middle slice, a gray channel squeezed."""
    if image.ndim == 4:
        image = image[image.shape[0] // 2]
    return image[..., 0] if image.shape[-1] == 1 else image


def plot_reconstructions(
    originals: tuple[np.ndarray, np.ndarray | None],
    rows: list[tuple[str, np.ndarray, np.ndarray | None]],
    path: Path,
) -> None:
    """Originals on top, one row of reconstructions per protection (a volume's middle slice);
    a segmentation's masks (``[B, H, W]`` labels, or None) sit right of their images."""
    images, masks = originals
    batch = images.shape[0]
    columns = batch * (1 if masks is None else 2)
    fig = Figure(figsize=(1.6 * columns + 1.6, 1.6 * (len(rows) + 1)))
    grid = fig.subplots(len(rows) + 1, columns, squeeze=False)
    lo, hi = data_range(images)
    for r, (name, shown_images, shown_masks) in enumerate([("original", *originals), *rows]):
        for b in range(batch):
            panels = [np.clip((_show(shown_images[b]) - lo) / (hi - lo), 0, 1)]
            if masks is not None:
                panels.append(shown_masks[b] / max(int(masks.max()), 1))
            for i, panel in enumerate(panels):
                ax = grid[r, b * len(panels) + i]
                ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
            if b == 0:
                grid[r, 0].set_ylabel(name, fontsize=8)
    title = "reconstructions (image, mask)" if masks is not None else "reconstructions"
    fig.suptitle(f"{title} by protection", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
