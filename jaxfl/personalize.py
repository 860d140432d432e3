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

from jaxfl.algorithms.base import ServerState
from jaxfl.algorithms.local import local_train
from jaxfl.backends import ClientBackend, make_backend
from jaxfl.simulate import CLIENT_STREAM, PERSONALIZE_STREAM, client_key, client_rows, round_metrics
from jaxfl.tasks import CLASSIFICATION, Task, client_summaries
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
    res = local_train(
        loss_fn, optax.sgd(lr), params, data, key, batch_size=batch_size, epochs=1, steps=steps
    )
    return res.params


def _stats(task: Task, apply_fn: Callable[..., jax.Array], params: Params, data: ClientData):
    """Per-example evaluation stats ``[N, ...]`` of one client's examples."""
    return task.eval_stats(
        apply_fn({"params": params}, data.examples[task.input_key]), data.examples
    )


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


PersonalizedEval = Callable[[Params, ClientArrays, ClientArrays, int], dict[str, np.ndarray]]


def make_personalized_eval(
    loss_fn: LossFn,
    apply_fn: Callable[..., jax.Array],
    *,
    adapt_steps: int,
    adapt_lr: float,
    batch_size: int,
    seed: int,
    backend: ClientBackend | None = None,
    task: Task = CLASSIFICATION,
) -> PersonalizedEval:
    """``(global params, train [K,...], heldout [K,...], round) -> {metric: [K]}`` after adapting
    (the ``task``'s per-client metrics, e.g. ``accuracy``).

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
        return _stats(task, apply_fn, p, heldout)

    stats = backend.map(one)

    def evaluate(params, train, heldout, round_idx):
        per_client = placed(client_rows(train), client_rows(heldout))
        out = stats((params, jnp.int32(round_idx)), per_client, *_all(train.num_clients))
        return client_summaries(task, out, heldout)

    return evaluate


class ClientModelEval:
    """Each client's own model on its own held-out split: ``(params [K, ...], heldout) ->
    {metric: [K]}``, mapped through ``backend`` (the local-only baseline's models, Ditto's
    personal models)."""

    def __init__(self, backend: ClientBackend, task: Task, apply_fn: Callable[..., jax.Array]):
        self.backend = backend
        self.task = task
        self._stats = backend.map(
            lambda shared, client, cid, valid: _stats(task, apply_fn, *client)
        )
        self._placed_heldout = _Placed(backend)

    def __call__(self, params_c: Params, heldout: ClientArrays) -> dict[str, np.ndarray]:
        (heldout_c,) = self._placed_heldout(client_rows(heldout))
        per_client = (self.backend.place(params_c), heldout_c)
        out = self._stats((), per_client, *_all(heldout.num_clients))
        return client_summaries(self.task, out, heldout)


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
        task: Task = CLASSIFICATION,
    ):
        self.task = task
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
            return res.params, {**res.sums, "num_steps": res.num_steps.astype(jnp.float32)}

        self._round = self.backend.map(one)
        self._evaluate: ClientModelEval | None = None

    def init(self, params: Params) -> ServerState:
        """Every client starts from the same ``params``; the state holds them stacked."""
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (self.num_clients, *x.shape)), params)
        return ServerState(stacked, (), jnp.zeros((), jnp.int32))

    def checkpoint_state(self, state: ServerState) -> ServerState:
        """``state`` as a checkpoint holds it (the per-client models ``[K, ...]`` as they are)."""
        return state

    def restore_state(self, state: ServerState) -> ServerState:
        """A restored :meth:`checkpoint_state`."""
        return state

    def run_round(self, state: ServerState, round_idx: int) -> tuple[ServerState, dict]:
        """One round of local training on every client; returns the state and round metrics."""
        params, per_client = self._round(
            jnp.int32(round_idx),
            (self.backend.place(state.params), self._train_c),
            *_all(self.num_clients),
            costs=np.asarray(self.train.counts, np.float64),
        )
        sums = {k: jnp.sum(v) for k, v in per_client.items()}
        state = ServerState(params, (), state.round + 1)
        return state, round_metrics(self.task, sums, self.num_clients)

    def evaluate(
        self, state: ServerState, heldout: ClientArrays, apply_fn
    ) -> dict[str, np.ndarray]:
        """Each client's own model on its own held-out split: ``{metric: [K]}``."""
        if self._evaluate is None:
            self._evaluate = ClientModelEval(self.backend, self.task, apply_fn)
        return self._evaluate(state.params, heldout)
