"""Personalization: adapt-then-test evaluation and the local-only baseline.

:func:`make_personalized_eval` is the protocol PPPML-HMI uses for Per-FedAvg, applied to any
algorithm so comparisons are fair: every client starts from the current global model, takes
``adapt_steps`` SGD steps of size ``adapt_lr`` on batches of its own training data, and is
tested on its own held-out split. :class:`LocalOnly` trains one model per client with no
communication at all, for the same number of rounds and local epochs.

Clients are mapped through a :mod:`jaxfl.backends` backend, the same one the simulator uses.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfl.algorithms.base import ServerState, epoch_permutation, local_train
from jaxfl.backends import ClientBackend, make_backend
from jaxfl.evaluate import per_client_accuracy
from jaxfl.simulate import CLIENT_STREAM, PERSONALIZE_STREAM, Simulator, client_key, client_rows
from jaxfl.types import ClientArrays, ClientData, LossFn, Params, PRNGKey


def adapt_params(
    loss_fn: LossFn,
    params: Params,
    data: ClientData,
    key: PRNGKey,
    *,
    steps: int,
    lr: float,
    batch_size: int,
) -> Params:
    """``steps`` plain SGD steps of size ``lr`` on one client's data (shuffled batches).

    Step ``j`` uses batch ``j mod b`` of shuffle ``j // b`` (``b`` batches per pass over the
    client's ``n`` real examples), so more steps than batches cycle through fresh shuffles.
    """
    count = data.count.astype(jnp.int32)
    batches = jnp.maximum((count + batch_size - 1) // batch_size, 1)
    n_slots = data.mask.shape[0]
    pad = -(-n_slots // batch_size) * batch_size - n_slots

    def step(j, p):
        perm = jnp.pad(epoch_permutation(key, data.mask, j // batches), (0, pad))
        start = (j % batches) * batch_size
        idx = jax.lax.dynamic_slice(perm, (start,), (batch_size,))
        m = ((start + jnp.arange(batch_size)) < count).astype(jnp.float32)
        grads, _ = jax.grad(loss_fn, has_aux=True)(p, data.images[idx], data.labels[idx], m)
        return jax.tree.map(lambda w, g: w - lr * g, p, grads)

    return jax.lax.fori_loop(0, steps, step, params)


def _correct(apply_fn: Callable[..., jax.Array], params: Params, data: ClientData) -> jax.Array:
    """Number of correctly classified real examples of one client."""
    logits = apply_fn({"params": params}, data.images)
    return jnp.sum((jnp.argmax(logits, -1) == data.labels) * data.mask)


class _Placed:
    """``backend.place`` of the last pytrees it was given, reused while the same arrays come back
    (evaluation gets the same client arrays every round: place them once)."""

    def __init__(self, backend: ClientBackend):
        self.backend = backend
        self._src: tuple | None = None
        self._placed = None

    def __call__(self, *trees):
        leaves = jax.tree.leaves(trees)
        if self._src is None or any(a is not b for a, b in zip(self._src, leaves, strict=True)):
            self._src, self._placed = leaves, self.backend.place(trees)
        return self._placed


def _all(num_clients: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(num_clients, dtype=np.int32), np.ones(num_clients, bool)


PersonalizedEval = Callable[[Params, ClientArrays, ClientArrays, int], np.ndarray]


def make_personalized_eval(
    loss_fn: LossFn,
    apply_fn: Callable[..., jax.Array],
    *,
    adapt_steps: int,
    adapt_lr: float,
    batch_size: int,
    seed: int,
    backend: ClientBackend | None = None,
) -> PersonalizedEval:
    """``(global params, train [K,...], heldout [K,...], round) -> accuracy [K]`` after adapting.

    Client ``c`` adapts with key ``fold_in(fold_in(stream, round), c)``, so results do not depend
    on the ``backend`` (default: ``make_backend("auto")``). ``adapt_steps = 0`` tests the global
    model itself.
    """
    if adapt_steps < 0 or (adapt_steps and adapt_lr <= 0):
        raise ValueError(
            f"Personalized evaluation needs adapt_steps >= 0 and adapt_lr > 0, got "
            f"{adapt_steps=}, {adapt_lr=}."
        )
    stream = jax.random.fold_in(jax.random.key(seed), PERSONALIZE_STREAM)
    backend = backend or make_backend("auto")
    placed = _Placed(backend)

    def one(shared, client, cid, valid):
        del valid  # padding slots' outputs are dropped by the backend
        params, round_idx = shared
        train, heldout = client
        p = adapt_params(
            loss_fn,
            params,
            train,
            client_key(stream, round_idx, cid),
            steps=adapt_steps,
            lr=adapt_lr,
            batch_size=batch_size,
        )
        return _correct(apply_fn, p, heldout)

    correct = backend.map(one)

    def evaluate(params, train, heldout, round_idx):
        per_client = placed(client_rows(train), client_rows(heldout))
        counts = correct((params, jnp.int32(round_idx)), per_client, *_all(train.num_clients))
        return per_client_accuracy(counts, heldout.counts)

    return evaluate


class LocalOnly:
    """The local-only baseline: every client trains its own model on its own data, alone.

    Same interface as :class:`jaxfl.simulate.Simulator` (``run_round(state, r)``), with
    ``state.params`` stacked over clients ``[K, ...]``. Each round every client runs
    ``epochs`` local epochs (fresh optimizer state, as in the federated runs) with the
    simulator's client keys, so a local-only run spends the same local compute as FedAvg.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        optimizer: optax.GradientTransformation,
        train: ClientArrays,
        *,
        batch_size: int,
        epochs: int,
        seed: int = 0,
        backend: ClientBackend | None = None,
    ):
        self.backend = backend or make_backend("auto")
        self.num_clients = self.per_round = train.num_clients
        self.train = train
        self._train_c = self.backend.place(client_rows(train))
        self.strategy = f"local-only ({self.backend.name})"
        client_stream = jax.random.fold_in(jax.random.key(seed), CLIENT_STREAM)

        def one(shared, client, cid, valid):
            params, data = client
            key = client_key(client_stream, shared, cid)
            res = local_train(
                loss_fn, optimizer, params, data._replace(count=jnp.where(valid, data.count, 0)),
                key, batch_size=batch_size, epochs=epochs,
            )  # fmt: skip
            return res.params, (res.loss_sum, res.correct, res.num_seen, res.num_steps)

        self._round = self.backend.map(one)
        self._correct: Callable | None = None
        self._placed_heldout = _Placed(self.backend)

    def init(self, params: Params) -> ServerState:
        """Every client starts from the same ``params``; the state holds them stacked."""
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (self.num_clients, *x.shape)), params)
        return ServerState(stacked, (), jnp.zeros((), jnp.int32))

    def run_round(self, state: ServerState, round_idx: int) -> tuple[ServerState, dict]:
        """One round of local training on every client; returns the state and round metrics."""
        params, (loss_sum, correct, seen, steps) = self._round(
            jnp.int32(round_idx),
            (self.backend.place(state.params), self._train_c),
            *_all(self.num_clients),
        )
        sums = {
            "loss_sum": jnp.sum(loss_sum),
            "correct": jnp.sum(correct),
            "num_seen": jnp.sum(seen),
            "num_steps": jnp.sum(steps).astype(jnp.float32),
        }
        state = ServerState(params, (), state.round + 1)
        return state, Simulator._round_metrics(sums, self.num_clients)

    def evaluate(self, state: ServerState, heldout: ClientArrays, apply_fn) -> np.ndarray:
        """Each client's own model on its own held-out split: accuracy ``[K]``."""
        if self._correct is None:
            self._correct = self.backend.map(
                lambda shared, client, cid, valid: _correct(apply_fn, *client)
            )
        (heldout_c,) = self._placed_heldout(client_rows(heldout))
        per_client = (self.backend.place(state.params), heldout_c)
        correct = self._correct((), per_client, *_all(self.num_clients))
        return per_client_accuracy(correct, heldout.counts)
