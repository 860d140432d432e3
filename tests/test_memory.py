"""The memory model (jaxfl.memory) and the automatic chunk size (config.chunk_size = 0)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import TinyMLP, make_client_arrays

from configs import debug
from jaxfl import backends, factories, memory
from jaxfl.algorithms import classification_loss, fedavg
from jaxfl.errors import ConfigError
from jaxfl.metrics import read_metrics
from jaxfl.simulate import client_contribution
from jaxfl.sweep import apply_overrides
from jaxfl.train import train_and_evaluate
from jaxfl.types import ClientData
from jaxfl.validate import validate_config


def _program(examples: int, shape=(8, 8, 1)):
    """``(fn, shared, one client's shapes)`` of FedAvg's contribution for TinyMLP clients of
    ``examples`` examples each (shapes only: nothing is initialized)."""
    model = TinyMLP(hidden=16)
    alg = fedavg(
        classification_loss(model.apply), optax.adam(1e-2), optax.sgd(1.0), batch_size=4, epochs=1
    )
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape))))
    state = jax.eval_shape(alg.init, params["params"])
    shared = (
        jax.eval_shape(alg.broadcast, state),
        jax.eval_shape(lambda: jax.random.key(0)),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    client = ClientData(
        {
            "image": jax.ShapeDtypeStruct((examples, *shape), jnp.float32),
            "label": jax.ShapeDtypeStruct((examples,), jnp.int32),
        },
        jax.ShapeDtypeStruct((examples,), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    return client_contribution(alg), shared, client


def test_chosen_chunk_fits_the_cap_by_xlas_own_count_and_one_more_would_not():
    fn, shared, client = _program(32)
    est = memory.estimate_client_memory(fn, shared, client)
    # A cap half a client above the estimate of 3 clients: 3 fit, 4 do not.
    cap = est.bytes_for(3) + est.per_client_bytes // 2
    chunk = memory.largest_chunk(est, cap)
    assert chunk == 3
    assert memory.chunk_bytes(fn, shared, client, chunk) <= cap
    assert memory.chunk_bytes(fn, shared, client, chunk + 1) > cap
    assert memory.largest_chunk(est, cap, limit=2) == 2  # never more than a round's clients


def test_fit_is_linear_positive_and_grows_with_examples_per_client():
    fn, shared, small = _program(16)
    _, _, large = _program(256)
    a = memory.estimate_client_memory(fn, shared, small)
    b = memory.estimate_client_memory(fn, shared, large)
    assert a.per_client_bytes > 0 and a.measured[1] > a.measured[0]
    # 240 more examples of 8x8 float32 (+ labels, mask) at least: the client's data is counted.
    assert b.per_client_bytes - a.per_client_bytes >= 240 * (64 * 4 + 4 + 4)
    # The line predicts a third chunk size it was not fitted to within 10%.
    measured = memory.chunk_bytes(fn, shared, small, 6)
    assert abs(a.bytes_for(6) - measured) <= 0.1 * measured


def test_impossible_cap_is_a_config_error_naming_the_fields():
    fn, shared, client = _program(16)
    per_client = jax.tree.map(lambda s: jax.ShapeDtypeStruct((5, *s.shape), s.dtype), client)
    with pytest.raises(ConfigError, match="memory_limit_gb") as e:
        memory.auto_chunk_size(fn, shared, per_client, cap_bytes=1000)
    assert "local.batch_size" in str(e.value) and "not even one client" in str(e.value)


def test_validation_accepts_automatic_chunk_size_and_refuses_negative_fields():
    config = debug.get_config()
    config.chunk_size = 0
    config.memory_limit_gb = 0.5
    validate_config(config)
    config.chunk_size = -1
    config.memory_limit_gb = -2.0
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    assert "config.chunk_size=-1" in str(e.value) and "config.memory_limit_gb=-2.0" in str(e.value)


# A 2-round debug run of 6 MLP clients, streamed, its chunk chosen under a 20 MiB cap.
STREAMED_AUTO = {
    "rounds": 2,
    "num_clients": 6,
    "data.n_train": 240,
    "data.n_test": 64,
    "local.epochs": 1,
    "model.name": "mlp",
    "placement": "stream",
    "chunk_size": 0,
    "memory_limit_gb": 0.02,
    "checkpoint_every": 0,
}


def test_config_with_automatic_chunk_size_streams_end_to_end(tmp_path, caplog):
    config = apply_overrides(debug.get_config(), STREAMED_AUTO)
    with caplog.at_level(logging.INFO):
        final = train_and_evaluate(config, tmp_path)
    chosen = [r.getMessage() for r in caplog.records if "Automatic chunk size" in r.getMessage()]
    assert len(chosen) == 1 and "per client" in chosen[0] and "cap 20.5 MiB" in chosen[0]
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["round"] for m in lines] == [1, 2]
    assert final["clients"] == 6 and 0 <= final["test_accuracy"] <= 1


def _debug_program(name: str, **overrides):
    """``client_program`` of the debug config's MLP for algorithm ``name`` on 5 clients."""
    config = apply_overrides(
        debug.get_config(),
        {"model.name": "mlp", "algorithm.name": name, "local.optimizer": "sgd", **overrides},
    )
    model = factories.build_model(config, 4)
    task = factories.build_task(config)
    train = make_client_arrays([6, 4, 8, 5, 7], n_slots=8, shape=(8, 8, 1), num_classes=4)
    algorithm = factories.build_algorithm(config, model, None, task)
    return config, train, factories.client_program(config, task, model, train, algorithm)


def test_a_stateful_clients_state_counts_in_its_memory_and_against_resident_data():
    _, train, (fn, shared, stateless) = _debug_program("fedavg")
    config, _, (sfn, sshared, stateful) = _debug_program("scaffold")
    data, states = stateful
    assert jax.tree.leaves(states)[0].shape[0] == train.num_clients
    plain = memory.estimate_client_memory(fn, shared, memory.one_client(stateless))
    with_state = memory.estimate_client_memory(sfn, sshared, memory.one_client(stateful))
    # SCAFFOLD's control variate c_i is one copy of the parameters per client, an argument of
    # every client's program (the two programs' temporaries differ, hence the margin).
    params_bytes = backends.tree_nbytes(shared[0])  # FedAvg broadcasts the parameters
    assert with_state.per_client_bytes - plain.per_client_bytes >= params_bytes // 2
    # On resident data the chunk pays for every client's rows and state up front.
    config.chunk_size, config.strategy, config.memory_limit_gb = 0, "chunked", 1.0
    program = (sfn, sshared, stateful)
    resident = backends.tree_nbytes(stateful)
    assert resident > backends.tree_nbytes(train)
    chunk = factories.resolve_chunk_size(config, train, "device", program, jax.devices())
    assert chunk == train.num_clients  # 1 GiB holds a round of these 5 clients
    config.memory_limit_gb = (resident + with_state.bytes_for(2) + 1) / 2**30
    assert factories.resolve_chunk_size(config, train, "device", program, jax.devices()) == 2


def test_stateful_run_with_automatic_chunk_size_streams_end_to_end(tmp_path):
    scaffold = {"algorithm.name": "scaffold", "local.optimizer": "sgd", "local.learning_rate": 0.05}
    config = apply_overrides(debug.get_config(), {**STREAMED_AUTO, **scaffold})
    final = train_and_evaluate(config, tmp_path)
    assert [m["round"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert final["clients"] == 6 and 0 <= final["test_accuracy"] <= 1
