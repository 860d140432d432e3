"""What one client's gradient leaks: iDLG reconstruction quality vs Gaussian noise on it.

    python benchmarks/attack_leakage.py --json out.json

A real MedMNIST image when the file is there (``--data breastmnist`` under ``JAXFL_DATA_DIR``,
28x28 grey), else a synthetic one; a sigmoid MLP (DLG's smooth setting) at its
initialization; the client's gradient of one example, with Gaussian noise of each
``--noise`` std added to every coordinate (what local DP's noise does to what the server
sees; the table also gives the noise's norm over the gradient's). iDLG reads the label off the
output layer and optimizes the image (Adam lr 0.1, ``--steps``, ``--restarts``). Prints PSNR /
SSIM per noise level and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfl.attacks import AttackConfig, invert, psnr, recover_labels, ssim

RANGE = (-1.0, 1.0)


class SigmoidMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.sigmoid(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        return nn.Dense(2)(x)


def _image(name: str) -> tuple[np.ndarray, str]:
    path = Path(os.environ.get("JAXFL_DATA_DIR", "../shared/data")) / f"{name}.npz"
    if path.is_file():
        with np.load(path) as npz:
            img = npz["train_images"][0].astype(np.float32) / 127.5 - 1.0
        return img[None, ..., None], f"{name} train image 0"
    yy, xx = np.mgrid[0:28, 0:28] / 27.0
    img = np.clip(np.exp(-((xx - 0.6) ** 2 + (yy - 0.4) ** 2) / 0.05) + 0.5 * xx - 0.7, -1, 1)
    return img.astype(np.float32)[None, ..., None], "synthetic blob"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="breastmnist")
    p.add_argument("--noise", default="0,0.001,0.01,0.1")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    image, source = _image(args.data)
    model = SigmoidMLP()
    params = model.init(jax.random.key(0), jnp.zeros(image.shape))["params"]

    def grad_fn(prm, images, soft):
        loss = lambda q: optax.softmax_cross_entropy(
            model.apply({"params": q}, images), soft
        ).mean()  # noqa: E731
        return jax.grad(loss)(prm)

    label = jnp.array([1])
    clean = grad_fn(params, jnp.asarray(image), jax.nn.one_hot(label, 2))
    leaves, tree = jax.tree.flatten(clean)
    grad_norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in leaves)))
    size = sum(g.size for g in leaves)
    config = AttackConfig(method="idlg", steps=args.steps, restarts=args.restarts)
    rows = []
    print(f"{source}; gradient norm {grad_norm:.3g} over {size} coordinates")
    print(f"{'noise std':>10s} {'noise/grad':>11s} {'label ok':>9s} {'PSNR dB':>8s} {'SSIM':>6s}")
    for std in (float(s) for s in args.noise.split(",")):
        keys = jax.random.split(jax.random.key(7), len(leaves))
        noisy = jax.tree.unflatten(
            tree,
            [g + std * jax.random.normal(k, g.shape) for g, k in zip(leaves, keys, strict=True)],
        )
        out = noisy["Dense_1"]
        labels = recover_labels(out["kernel"], out["bias"])
        result = invert(grad_fn, params, noisy, jax.random.key(1), image.shape, 2, config, labels)
        row = {
            "noise_std": std,
            "noise_over_grad_norm": std * np.sqrt(size) / grad_norm,
            "label_correct": bool(labels[0] == label[0]),
            "psnr_db": float(psnr(jnp.asarray(image), result["images"], RANGE)[0]),
            "ssim": float(ssim(jnp.asarray(image), result["images"], RANGE)[0]),
        }
        rows.append(row)
        print(
            f"{std:10.3g} {row['noise_over_grad_norm']:11.3g} {str(row['label_correct']):>9s} "
            f"{row['psnr_db']:8.1f} {row['ssim']:6.3f}",
            flush=True,
        )
    if args.json:
        meta = {"image": source, "steps": args.steps, "restarts": args.restarts}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
