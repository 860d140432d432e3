"""Personalization: adapt-then-test evaluation and the local-only baseline.

:func:`make_personalized_eval` is the protocol PPPML-HMI uses for Per-FedAvg, applied to any
algorithm so comparisons are fair: every client starts from the current global model, takes
``adapt_steps`` SGD steps of size ``adapt_lr`` on batches of its own training data, and is
tested on its own held-out split. :class:`LocalOnly` trains one model per client with no
communication at all, for the same number of rounds and local epochs.

Clients are mapped with ``jax.lax.map`` inside one jit: ``map_batch=None`` runs them one after
another (the fast choice on CPU), an int vmaps that many at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfl.algorithms.base import ServerState, epoch_permutation, local_train
from jaxfl.evaluate import per_client_accuracy
from jaxfl.simulate import CLIENT_STREAM, PERSONALIZE_STREAM, Simulator, client_key
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


def _rows(arrays: ClientArrays) -> ClientData:
    """The client arrays as a ClientData pytree with a leading client axis (for lax.map)."""
    return ClientData(arrays.images, arrays.labels, arrays.mask, arrays.counts)


PersonalizedEval = Callable[[Params, ClientArrays, ClientArrays, int], np.ndarray]


def make_personalized_eval(
    loss_fn: LossFn,
    apply_fn: Callable[..., jax.Array],
    *,
    adapt_steps: int,
    adapt_lr: float,
    batch_size: int,
    seed: int,
    map_batch: int | None = None,
) -> PersonalizedEval:
    """``(global params, train [K,...], heldout [K,...], round) -> accuracy [K]`` after adapting.

    Client ``c`` adapts with key ``fold_in(fold_in(stream, round), c)``, so results do not depend
    on ``map_batch``. ``adapt_steps = 0`` tests the global model itself.
    """
    if adapt_steps < 0 or (adapt_steps and adapt_lr <= 0):
        raise ValueError(
            f"Personalized evaluation needs adapt_steps >= 0 and adapt_lr > 0, got "
            f"{adapt_steps=}, {adapt_lr=}."
        )
    stream = jax.random.fold_in(jax.random.key(seed), PERSONALIZE_STREAM)

    @jax.jit
    def correct(params, train, heldout, round_idx):
        def one(xs):
            cid, tr, ho = xs
            p = adapt_params(
                loss_fn,
                params,
                tr,
                client_key(stream, round_idx, cid),
                steps=adapt_steps,
                lr=adapt_lr,
                batch_size=batch_size,
            )
            return _correct(apply_fn, p, ho)

        ids = jnp.arange(train.counts.shape[0], dtype=jnp.int32)
        return jax.lax.map(one, (ids, _rows(train), _rows(heldout)), batch_size=map_batch)

    def evaluate(params, train, heldout, round_idx):
        return per_client_accuracy(
            correct(params, train, heldout, jnp.int32(round_idx)), heldout.counts
        )

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
        map_batch: int | None = None,
    ):
        self.train = ClientArrays(*(jnp.asarray(a) for a in train))
        self.num_clients = self.per_round = train.num_clients
        self.strategy = "local-only"
        client_stream = jax.random.fold_in(jax.random.key(seed), CLIENT_STREAM)

        @jax.jit
        def round_fn(stacked, arrays, round_idx):
            def one(xs):
                cid, p, data = xs
                key = client_key(client_stream, round_idx, cid)
                res = local_train(
                    loss_fn, optimizer, p, data, key, batch_size=batch_size, epochs=epochs
                )
                return res.params, (res.loss_sum, res.correct, res.num_seen, res.num_steps)

            ids = jnp.arange(self.num_clients, dtype=jnp.int32)
            return jax.lax.map(one, (ids, stacked, _rows(arrays)), batch_size=map_batch)

        self._round = round_fn

    def init(self, params: Params) -> ServerState:
        """Every client starts from the same ``params``; the state holds them stacked."""
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (self.num_clients, *x.shape)), params)
        return ServerState(stacked, (), jnp.zeros((), jnp.int32))

    def run_round(self, state: ServerState, round_idx: int) -> tuple[ServerState, dict]:
        """One round of local training on every client; returns the state and round metrics."""
        params, (loss_sum, correct, seen, steps) = self._round(
            state.params, self.train, jnp.int32(round_idx)
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
        correct = _local_correct(apply_fn, state.params, heldout)
        return per_client_accuracy(correct, heldout.counts)


@jax.jit(static_argnums=0)
def _local_correct(apply_fn, stacked: Params, heldout: ClientArrays) -> jax.Array:
    """Correct counts ``[K]`` of per-client models ``stacked [K, ...]`` on their held-out data."""
    return jax.lax.map(lambda xs: _correct(apply_fn, *xs), (stacked, _rows(heldout)))
