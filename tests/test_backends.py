"""Execution backends: each equals the reference loop, shard_map on 1, 2 and 8 host devices.

conftest.py gives this process 8 XLA:CPU devices, so the meshes below are real multi-device
meshes (threads of one process, as on a multi-core CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, make_client_arrays, max_abs_diff, reference_round

from jaxfl.algorithms import classification_loss, fedavg, fedprox
from jaxfl.algorithms.perfedavg import perfedavg
from jaxfl.backends import (
    StreamingBackend,
    balanced_positions,
    choose_placement,
    default_strategy,
    make_backend,
    resolve_strategy,
)
from jaxfl.personalize import LocalOnly, make_personalized_eval
from jaxfl.privacy.dp_sgd import DPSGD
from jaxfl.privacy.update_dp import UpdateDP
from jaxfl.secure.aggregators import make_host_aggregator
from jaxfl.simulate import Simulator

# Ten clients, one of them empty: enough for a slot on each of 8 devices.
COUNTS = [5, 12, 1, 9, 7, 3, 0, 6, 11, 4]
BACKENDS = [
    ("vmap", 0),
    ("chunked", 0),
    ("scan", 0),
    ("loop", 0),
    ("shard_map", 1),
    ("shard_map", 2),
    ("shard_map", 8),
]


def _backend(strategy: str, devices: int, stream: int = 0):
    """``strategy`` on ``devices`` (0: the default); ``stream > 0`` streams that many clients
    at a time from the host."""
    backend = make_backend(strategy, chunk_size=3, devices=jax.devices()[:devices] or None)
    return StreamingBackend(backend, stream) if stream else backend


def _algorithm(model, name: str):
    loss = classification_loss(model.apply)
    kw = dict(batch_size=4, epochs=2)
    if name == "fedavg":
        return fedavg(loss, optax.sgd(0.1), optax.sgd(1.0), **kw)
    if name == "fedprox":
        return fedprox(loss, optax.adam(1e-2), optax.sgd(1.0), mu=0.5, **kw)
    if name == "perfedavg":
        return perfedavg(loss, optax.sgd(1.0), alpha=0.1, beta=0.05, variant="hf", **kw)
    if name == "dp_record":
        dp = DPSGD(clip_norm=0.3, noise_multiplier=1.1, microbatch_size=4)
        return fedavg(loss, optax.sgd(0.1), optax.sgd(1.0), dp=dp, **kw)
    update_dp = UpdateDP("local", clip_norm=0.5, noise_std=0.05)
    return fedavg(loss, optax.sgd(0.5), optax.sgd(1.0), update_dp=update_dp, **kw)


STREAMED = [("vmap", 0), ("loop", 0), ("shard_map", 2)]
# FedAvg runs on every backend; for the other algorithms the default suite checks shard_map
# (their own tests cover vmap, chunked and loop; shard_map runs scan within each device), and
# the slow suite every backend.
NEW_BACKENDS = [("shard_map", 2)]
OTHERS = ["fedprox", "perfedavg", "dp_record", "dp_local"]
# shard_map for the other algorithms: the slow suite. FedProx and local update DP are FedAvg's
# client update plus a loss term / a host-side clip and noise that every backend shares;
# record-level DP and Per-FedAvg are checked under every strategy in test_dp_sgd.py and
# test_perfedavg.py.
SLOW_ON_SHARD_MAP = ("fedprox", "dp_local", "dp_record", "perfedavg")


@pytest.mark.parametrize(
    "name, backends",
    [("fedavg", BACKENDS)]
    + [
        pytest.param(
            name, NEW_BACKENDS, marks=[pytest.mark.slow] if name in SLOW_ON_SHARD_MAP else []
        )
        for name in OTHERS
    ]
    + [pytest.param(name, BACKENDS, marks=pytest.mark.slow) for name in OTHERS],
)
def test_every_backend_matches_the_reference_loop(tiny_model, tiny_params, name, backends):
    algorithm = _algorithm(tiny_model, name)
    arrays = make_client_arrays(COUNTS, n_slots=13)
    nonempty = [c for c, n in enumerate(COUNTS) if n]
    ref = reference_round(algorithm, tiny_params, arrays, nonempty, 3, 0).params
    assert max_abs_diff(ref, tiny_params) > 1e-4  # the round moved the model
    # FedAvg also with the data streamed from the host, 4 clients at a time (3 chunks, the
    # last one padded): one backend per kind of inner mapping (vmapped, sequential in one jit,
    # Python loop, sharded); the streaming wrapper is the same code over each.
    runs = [(s, d, 0) for s, d in backends]
    if name == "fedavg":
        runs += [(s, d, 4) for s, d in STREAMED]
    for strategy, devices, stream in runs:
        backend = _backend(strategy, devices, stream)
        sim = Simulator(algorithm, arrays, seed=3, backend=backend)
        state, metrics = sim.run_round(sim.init(tiny_params), 0)
        assert_trees_close(state.params, ref)
        assert metrics["clients"] == len(COUNTS)


@pytest.mark.slow  # test_simulate.py checks Poisson rounds are strategy-independent
def test_sampled_and_poisson_rounds_agree_on_every_backend(tiny_model, tiny_params):
    algorithm = _algorithm(tiny_model, "fedavg")
    arrays = make_client_arrays(COUNTS * 2, n_slots=13)
    for sampling in (dict(clients_per_round=9), dict(poisson_rate=0.4)):
        finals = []
        for strategy, devices in [("loop", 0), ("shard_map", 2), ("shard_map", 8)]:
            backend = _backend(strategy, devices)
            sim = Simulator(algorithm, arrays, seed=1, backend=backend, **sampling)
            state = sim.init(tiny_params)
            for r in range(3):
                state, metrics = sim.run_round(state, r)
            finals.append(state.params)
            assert metrics["clients"] == len(sim.sample_clients(2))
        for params in finals[1:]:
            assert_trees_close(params, finals[0])


def test_secure_aggregation_rounds_agree_on_every_backend(tiny_model, tiny_params):
    algorithm = _algorithm(tiny_model, "fedavg")
    arrays = make_client_arrays(COUNTS, n_slots=13)
    plain = Simulator(algorithm, arrays, seed=1, strategy="loop", clients_per_round=8)
    ref, _ = plain.run_round(plain.init(tiny_params), 0)
    for strategy, devices in [("scan", 0), ("shard_map", 2), ("shard_map", 8)]:
        sim = Simulator(
            algorithm, arrays, seed=1, backend=_backend(strategy, devices), clients_per_round=8,
            host_aggregator=make_host_aggregator("secagg", seed=0),
        )  # fmt: skip
        state, metrics = sim.run_round(sim.init(tiny_params), 0)
        assert_trees_close(state.params, ref.params, atol=2e-5)  # SecAgg+ quantization
        assert metrics["secure_survivors"] == 8


def test_personalized_eval_and_local_only_agree_on_every_backend(tiny_model, tiny_params):
    loss = classification_loss(tiny_model.apply)
    train = make_client_arrays(COUNTS, n_slots=13)
    heldout = make_client_arrays([4, 3, 2, 5, 1, 6, 2, 3, 4, 5], n_slots=6, seed=1)
    accs, local = [], []
    runs = [("vmap", 0, 0), ("loop", 0, 0), ("shard_map", 8, 0), ("loop", 0, 4)]
    for strategy, devices, stream in runs:
        backend = _backend(strategy, devices, stream)
        evaluate = make_personalized_eval(
            loss, tiny_model.apply, adapt_steps=3, adapt_lr=0.3, batch_size=4, seed=0,
            backend=backend,
        )  # fmt: skip
        accs.append(evaluate(tiny_params, train, heldout, 2))
        only = LocalOnly(loss, optax.sgd(0.2), train, batch_size=4, epochs=2, backend=backend)
        state = only.init(tiny_params)
        for r in range(2):
            state, _ = only.run_round(state, r)
        local.append((state.params, only.evaluate(state, heldout, tiny_model.apply)))
        assert only.strategy == f"local-only ({backend.name})"
    for acc in accs[1:]:
        np.testing.assert_allclose(acc["accuracy"], accs[0]["accuracy"])
    assert not np.allclose(accs[0]["accuracy"], make_personalized_eval(
        loss, tiny_model.apply, adapt_steps=0, adapt_lr=0.3, batch_size=4, seed=0,
    )(tiny_params, train, heldout, 2)["accuracy"])  # fmt: skip  # adapting changed something
    for params, acc in local[1:]:
        assert_trees_close(params, local[0][0])
        np.testing.assert_allclose(acc["accuracy"], local[0][1]["accuracy"])


@pytest.mark.parametrize("strategy, devices", [("chunked", 0), ("loop", 0), ("shard_map", 8)])
def test_each_backend_traces_the_client_once_across_rounds(
    tiny_model, tiny_params, strategy, devices
):
    algorithm = _algorithm(tiny_model, "fedavg")
    traces = []

    def counted(broadcast, data, key):
        traces.append(1)  # runs when JAX traces, not when the compiled code runs
        return algorithm.client_update(broadcast, data, key)

    counting = algorithm._replace(client_update=counted)
    arrays = make_client_arrays(COUNTS * 2, n_slots=13)
    sim = Simulator(counting, arrays, backend=_backend(strategy, devices), clients_per_round=9)
    state, _ = sim.run_round(sim.init(tiny_params), 0)
    after_first = len(traces)
    for r in range(1, 4):  # other clients sampled, other owners per device: same programs
        state, _ = sim.run_round(state, r)
    assert len(traces) == after_first


def _client_fn(shared, client, cid, valid):
    """A toy client: its value times a shared scale, and its id; zeros when invalid."""
    return {"value": jnp.where(valid, client * shared, 0.0), "cid": jnp.where(valid, cid, 0)}


@pytest.mark.parametrize("stream", [0, 4])
@pytest.mark.parametrize("strategy, devices", BACKENDS)
def test_backend_contract_sum_and_map_in_the_order_of_the_ids(strategy, devices, stream):
    backend = _backend(strategy, devices, stream)
    per_client = backend.place(np.arange(11, dtype=np.float32) * 10)
    if stream:
        assert isinstance(per_client, np.ndarray)  # stays on the host
    ids = np.asarray([7, 2, 9, 0, 3, 10], np.int32)  # unsorted, uneven over devices
    valid = np.asarray([True, True, False, True, True, True])
    total = backend.sum(_client_fn)(jnp.float32(2), per_client, ids, valid)
    assert float(total["value"]) == 2 * 10 * (7 + 2 + 0 + 3 + 10)
    assert int(total["cid"]) == 7 + 2 + 0 + 3 + 10
    out = backend.map(_client_fn)(jnp.float32(2), per_client, ids, valid)
    np.testing.assert_array_equal(np.asarray(out["cid"]), ids[valid])
    np.testing.assert_allclose(np.asarray(out["value"]), 20.0 * ids[valid])


def test_streaming_with_no_valid_client_sums_to_zeros_and_maps_to_nothing():
    backend = _backend("loop", 0, stream=4)
    ids, valid = np.arange(3, dtype=np.int32), np.zeros(3, bool)
    per_client = np.arange(11, dtype=np.float32)
    total = backend.sum(_client_fn)(jnp.float32(2), per_client, ids, valid)
    assert float(total["value"]) == 0.0 and int(total["cid"]) == 0
    out = backend.map(_client_fn)(jnp.float32(2), per_client, ids, valid)
    assert out["value"].shape == (0,)


def test_balanced_positions_even_out_the_devices_work():
    # The 3D debug run's 8 clients (local steps): in place, device 0 does 44 steps, device 1 26.
    steps = np.array([4, 32, 4, 4, 6, 6, 10, 4], float)
    even = np.bincount(balanced_positions(steps, devices=2, per_device=4) // 4, weights=steps)
    assert even.max() == 44  # 4 clients each: the 32-step client's device still takes 3 more
    positions = balanced_positions(steps, devices=2, per_device=8)  # up to 8 each (scan)
    assert len(set(positions)) == 8 and positions.max() < 16
    loads = np.bincount(positions // 8, weights=steps)
    assert loads.max() == 36 and loads.sum() == steps.sum()
    np.testing.assert_array_equal(balanced_positions(np.ones(4), 2, 2), [0, 2, 1, 3])


def test_placement_streams_when_the_data_would_not_fit():
    cpu = jax.devices()[:1]
    assert choose_placement("auto", 1 << 20, cpu) == "device"
    assert choose_placement("auto", 1 << 60, cpu) == "stream"  # an exabyte
    assert choose_placement("device", 1 << 60, cpu) == "device"
    assert choose_placement("stream", 1, cpu) == "stream"
    with pytest.raises(ValueError, match="choose one of"):
        choose_placement("disk", 1, cpu)


def test_strategy_names_and_auto():
    assert default_strategy("cpu", 1) == "loop"
    assert default_strategy("gpu", 1) == "chunked"
    assert default_strategy("cpu", 2) == default_strategy("gpu", 4) == "shard_map"
    assert resolve_strategy("auto", jax.devices()) == "shard_map"  # 8 devices here
    assert resolve_strategy("vmap") == "vmap"
    with pytest.raises(ValueError, match="Unknown client-execution strategy"):
        resolve_strategy("pmap")
    with pytest.raises(ValueError, match="vmap, chunked or scan"):
        make_backend("shard_map", inner="loop")
    backend = make_backend("auto")
    assert backend.name == "shard_map" and len(backend.devices) == 8
    assert backend.description == "shard_map over 8 cpu devices, scan within each"


def _device_choice(env_update: dict[str, str]) -> dict:
    """What a fresh process that imports jaxfl gets: devices, ``auto`` and the logged choice."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    env.update(env_update, JAX_PLATFORMS="cpu")
    code = (
        "import json, jax, jaxfl\n"
        "from jaxfl import runtime\nfrom jaxfl.backends import make_backend\n"
        "b = make_backend()\n"
        "print(json.dumps({'devices': jax.device_count(), 'auto': b.name,"
        " 'choice': runtime.cpu_device_choice, 'cores': runtime.usable_cores()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_jaxfl_uses_every_usable_core_by_default_and_respects_the_users_choice():
    default = _device_choice({})
    assert default["devices"] == default["cores"]
    assert default["auto"] == ("shard_map" if default["cores"] > 1 else "loop")
    assert "one per usable core" in default["choice"]
    chosen = _device_choice({"JAXFL_CPU_DEVICES": "3"})
    assert (chosen["devices"], chosen["auto"]) == (3, "shard_map")
    assert _device_choice({"JAXFL_CPU_DEVICES": "1"})["auto"] == "loop"
    user = _device_choice({"JAX_NUM_CPU_DEVICES": "5"})
    assert user["devices"] == 5 and "set by the user" in user["choice"]
