"""The only place a config (``ml_collections.ConfigDict``) is turned into objects."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxfl.algorithms import FederatedAlgorithm, fedavg, fedprox
from jaxfl.algorithms.ditto import ditto
from jaxfl.algorithms.perfedavg import perfedavg
from jaxfl.algorithms.scaffold import scaffold
from jaxfl.backends import (
    ClientBackend,
    ClientFn,
    StreamingBackend,
    choose_placement,
    make_backend,
    resolve_strategy,
    tree_nbytes,
)
from jaxfl.data import (
    HELDOUT_STREAM,
    TRAIN_STREAM,
    AcquisitionShift,
    apply_to_clients,
    build_federated,
    load_medmnist,
    medmnist_path,
    medmnist_url,
    partition,
    resolve_data_dir,
    shifts_from_config,
    synthetic_dataset,
)
from jaxfl.data.ct import (
    CaseSpec,
    CTPreprocess,
    SliceSet,
    discover_covid19_ct_seg,
    discover_msd,
    load_cases,
    partition_by_patient,
    read_manifest,
    totalseg_example_cases,
)
from jaxfl.data.federated import materialize
from jaxfl.data.phantoms import phantom_slices
from jaxfl.data.segmentation import (
    federate_slices,
    manifest_splits,
    pad_to_multiple,
    patient_splits,
)
from jaxfl.data.volumes import (
    VolumePreprocess,
    discover_radchest,
    load_volumes,
    read_volume_csv,
    volume_dataset,
)
from jaxfl.errors import ConfigError
from jaxfl.memory import auto_chunk_size, memory_cap_bytes, per_device_chunk, shapes_of
from jaxfl.models import get_model
from jaxfl.personalize import LocalOnly, PersonalizedEval, make_personalized_eval
from jaxfl.privacy.plan import PrivacyPlan, plan_privacy
from jaxfl.secure.aggregators import HostAggregator, make_host_aggregator
from jaxfl.simulate import (
    INIT_STREAM,
    Simulator,
    client_contribution,
    client_rows,
    num_sampled_clients,
)
from jaxfl.tasks import CLASSIFICATION, Task, make_loss
from jaxfl.tasks.seg_ops import IGNORE_LABEL, balanced_class_weights
from jaxfl.tasks.segmentation import Segmentation
from jaxfl.types import ClientArrays, Dataset, FederatedData

# "local" is the local-only baseline (no communication), run by LocalOnly, not a Simulator.
ALGORITHMS = (
    "fedavg",
    "fedprox",
    "perfedavg_fo",
    "perfedavg_hf",
    "perfedavg_pppml",
    "scaffold",
    "ditto",
    "local",
)
OPTIMIZERS = ("sgd", "adam", "adamw")
DATA_SOURCES = ("synthetic", "medmnist", "radchest", "volume_csv")
VOLUME_SOURCES = ("radchest", "volume_csv")
# Which config.partition fields each partitioner takes.
PARTITION_ARGS = {
    "iid": (),
    "dirichlet": ("alpha",),
    "quantity_skew": ("sigma",),
    "pathological": ("classes_per_client",),
    "bloodmnist_paper": (),
}


TASKS = ("classification", "segmentation")
# Where segmentation slices come from (config.data.source with task.name="segmentation").
CT_SOURCES = ("ct_phantoms", "covid19_ct_seg", "msd", "ct_manifest", "totalseg_example")
# The metric progress bars, sweep summaries and plots show first, per task.
PRIMARY_METRICS = {"classification": CLASSIFICATION.primary, "segmentation": Segmentation.primary}


def build_task(config: ml_collections.ConfigDict, fed: FederatedData | None = None) -> Task:
    """The task named by ``config.task.name``, sized to ``fed`` (segmentation needs it)."""
    name = config.task.name
    if name == "classification":
        return CLASSIFICATION
    if name != "segmentation":
        raise ConfigError(f"config.task.name={name!r}; choose one of {TASKS}.")
    t = config.task
    num_classes = fed.num_classes if fed is not None else max(int(t.num_classes), 2)
    weights = tuple(t.class_weights) or None
    if t.balanced_weights:
        if weights is not None:
            raise ConfigError(
                "config.task.class_weights and config.task.balanced_weights are both set; "
                "give the weights or ask for the balanced ones, not both."
            )
        if fed is None:
            raise ValueError("balanced_weights are computed from the training masks; pass fed")
        weights = tuple(float(w) for w in balanced_class_weights(_train_masks(fed), num_classes))
        logging.info("Class-balanced cross-entropy weights: %s", weights)
    return Segmentation(
        num_classes=num_classes, loss=t.loss, class_weights=weights, dice_eps=t.dice_eps
    )


def _train_masks(fed: FederatedData) -> np.ndarray:
    """Every labelled pixel of the clients' real training slices (pooled)."""
    masks = np.asarray(fed.train.examples["mask"])[np.asarray(fed.train.mask) > 0]
    return masks[masks != IGNORE_LABEL]


def build_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """The centralized dataset named by ``config.data`` (synthetic or a MedMNIST ``.npz``).

    With ``data.fallback="synthetic"``, a missing MedMNIST file is replaced by synthetic data
    shaped by ``data.num_classes``/``image_shape``/``n_*``, with a warning; the dataset's name
    (logged in every metrics line) then says so.
    """
    data = config.data
    if data.source in VOLUME_SOURCES:
        return load_volume_dataset(config)[0]
    if data.source == "medmnist":
        path = medmnist_path(data.name, data.data_dir or None, data.size)
        if path.exists() or data.get("fallback", "") != "synthetic":
            return load_medmnist(data.name, data_dir=data.data_dir or None, size=data.size)
        logging.warning(
            "%s not found: using SYNTHETIC data instead (config.data.fallback='synthetic'). "
            "Results are not %s results. Official download: %s",
            path,
            data.name,
            medmnist_url(data.name, data.size),
        )
        name = f"synthetic (no {data.name} file)"
    elif data.source == "synthetic":
        name = data.name
    else:
        raise ValueError(f"config.data.source={data.source!r}; choose one of {DATA_SOURCES}.")
    return synthetic_dataset(
        num_classes=data.num_classes,
        image_shape=tuple(data.image_shape),
        n_train=data.n_train,
        n_val=data.n_val,
        n_test=data.n_test,
        seed=config.seed,
        noise=data.noise,
        name=name,
    )


def load_volume_dataset(
    config: ml_collections.ConfigDict,
) -> tuple[Dataset, np.ndarray, tuple[str, ...]]:
    """CT volumes of ``config.data`` (radchest / volume_csv) as a Dataset, each training
    volume's site index and the site names."""
    d, v = config.data, config.data.volume
    if d.source == "radchest":
        cases = discover_radchest(resolve_data_dir(d.data_dir or None), v.abnormality)
    elif not v.csv:
        raise ConfigError(
            "config.data.source='volume_csv' needs config.data.volume.csv: a CSV with columns "
            "image (NIfTI / .npy / .npz path), label (int), optional site and split."
        )
    else:
        cases = read_volume_csv(v.csv)
    pre = VolumePreprocess(
        shape=tuple(int(s) for s in v.shape),
        hu_window=tuple(float(h) for h in v.hu_window),
        intensity=v.intensity,
    )
    volumes = load_volumes(cases, pre, v.cache_dir or None)
    dataset, site = volume_dataset(
        volumes, v.test_fraction, config.seed, config.task.num_classes, d.name
    )
    logging.info(
        "CT volumes %s: %d sites %s, %d train / %d test volumes of %s",
        d.name,
        len(volumes.sites),
        list(volumes.sites),
        len(dataset.train.labels),
        len(dataset.test.labels),
        "x".join(str(s) for s in pre.shape),
    )
    return dataset, site, volumes.sites


def build_volume_data(
    config: ml_collections.ConfigDict,
    dataset: Dataset,
    site: np.ndarray,
    sites: tuple[str, ...],
) -> FederatedData:
    """CT volumes (:func:`load_volume_dataset`'s) as clients: one per site
    (``data.volume.sites="data"``), or the pooled training volumes split by
    ``config.partition`` (``"partition"``)."""
    mode = config.data.volume.sites
    if mode == "partition":
        return build_federated_data(config, dataset)
    if mode != "data":
        raise ConfigError(f"config.data.volume.sites={mode!r}; choose 'data' or 'partition'.")
    if config.num_clients != len(sites):
        raise ConfigError(
            f"config.num_clients={config.num_clients} but the volumes come from {len(sites)} "
            f"sites {list(sites)} (one client per site); set num_clients to {len(sites)}, or "
            "config.data.volume.sites='partition' to split the pooled volumes with "
            "config.partition."
        )
    indices = [np.flatnonzero(site == s) for s in range(len(sites))]
    fed = build_federated(
        dataset,
        indices,
        heldout_fraction=config.partition.heldout_fraction,
        seed=config.seed,
        lazy=True,
    )
    return _placed(config, _shifted(config, fed, is_3d=True))


def build_federated_data(config: ml_collections.ConfigDict, dataset: Dataset) -> FederatedData:
    """Partition ``dataset``'s training split over ``config.num_clients`` clients."""
    p = config.partition
    if p.name not in PARTITION_ARGS:
        raise ValueError(
            f"config.partition.name={p.name!r}; choose one of {tuple(PARTITION_ARGS)}."
        )
    kwargs = {k: p[k] for k in PARTITION_ARGS[p.name]}
    # partition.seed, when set, pins the split independently of the training seed (the BloodMNIST
    # paper's split uses numpy seed 42 whatever the run's seed).
    seed = p.get("seed", config.seed)
    try:
        indices = partition(p.name, dataset.train.labels, config.num_clients, seed, **kwargs)
    except ValueError as e:
        fields = ", ".join(f"config.partition.{k}={p[k]!r}" for k in PARTITION_ARGS[p.name])
        raise ConfigError(
            f"config.partition.name={p.name!r} ({fields or 'no parameters'}) cannot split "
            f"{len(dataset.train.labels)} training examples over config.num_clients="
            f"{config.num_clients}: {e}"
        ) from e
    fed = build_federated(
        dataset, indices, heldout_fraction=p.heldout_fraction, seed=config.seed, lazy=True
    )
    return _placed(config, _shifted(config, fed, is_3d=dataset.train.images.ndim == 5))


def data_placement(config: ml_collections.ConfigDict, train: ClientArrays) -> str:
    """Where ``train`` lives during the run, ``"device"`` or ``"stream"`` (host), from
    ``config.placement`` (``auto``: by its size, :func:`~jaxfl.backends.choose_placement`)."""
    return choose_placement(config.get("placement", "auto"), tree_nbytes(train), jax.devices())


def _placed(config: ml_collections.ConfigDict, fed: FederatedData) -> FederatedData:
    """``fed`` (built lazily) read into host arrays, unless its training data streams: then the
    clients stay lazy and each chunk is read from the source when it goes to the device."""
    if data_placement(config, fed.train) == "stream":
        return fed
    return fed._replace(train=materialize(fed.train), heldout=materialize(fed.heldout))


def _ct_preprocess(ct: ml_collections.ConfigDict) -> CTPreprocess:
    """``config.data.ct``'s preprocessing fields as a :class:`CTPreprocess`."""
    return CTPreprocess(
        size=tuple(ct.size) or None,
        window_level=ct.window_level,
        window_width=ct.window_width,
        intensity=ct.intensity,
        label_map=tuple(tuple(pair) for pair in ct.label_map) or None,
        lung_only=ct.lung_only,
        lung_labels=tuple(ct.lung_labels),
    )


def _ct_cases(config: ml_collections.ConfigDict) -> list[CaseSpec]:
    """The case list of a file-backed CT source."""
    d, ct = config.data, config.data.ct
    if d.source == "covid19_ct_seg":
        return discover_covid19_ct_seg(
            resolve_data_dir(d.data_dir or None), lung_masks=ct.lung_masks
        )
    if d.source == "msd":
        if not ct.msd_dirs:
            raise ConfigError(
                "config.data.source='msd' needs config.data.ct.msd_dirs: one nnU-Net / MSD "
                "dataset folder (imagesTr/, labelsTr/) per site."
            )
        return [case for folder in ct.msd_dirs for case in discover_msd(folder)]
    if d.source == "ct_manifest":
        if not ct.manifest:
            raise ConfigError(
                "config.data.source='ct_manifest' needs config.data.ct.manifest: a CSV with "
                "columns image, mask, patient, site (optional split, lung)."
            )
        return read_manifest(ct.manifest)
    if d.source == "totalseg_example":
        return totalseg_example_cases(d.data_dir or None)
    raise ConfigError(
        f"config.data.source={d.source!r}; for segmentation choose one of {CT_SOURCES}."
    )


def load_ct_slices(config: ml_collections.ConfigDict) -> tuple[SliceSet, list[CaseSpec] | None]:
    """The preprocessed CT slices of ``config.data`` (and the cases they came from, if files)."""
    d, ct = config.data, config.data.ct
    pre = _ct_preprocess(ct)
    if d.source == "ct_phantoms":
        slices = phantom_slices(
            num_sites=config.num_clients,
            patients_per_site=ct.patients_per_site,
            num_slices=ct.num_slices,
            size=tuple(ct.phantom_size),
            seed=config.seed,
            config=pre,
        )
        return slices, None
    cases = _ct_cases(config)
    return load_cases(cases, pre, ct.cache_dir or None), cases


def build_segmentation_data(config: ml_collections.ConfigDict) -> FederatedData:
    """Sites as clients, whole patients in each split, scanner shifts with masks aligned."""
    ct = config.data.ct
    slices, cases = load_ct_slices(config)
    if ct.sites == "patients":
        slices = partition_by_patient(slices, config.num_clients, config.seed)
    elif ct.sites != "data":
        raise ConfigError(f"config.data.ct.sites={ct.sites!r}; choose 'data' or 'patients'.")
    if len(slices.sites) != config.num_clients:
        raise ConfigError(
            f"config.num_clients={config.num_clients} but the data has {len(slices.sites)} "
            f"sites {list(slices.sites)} (one client per site); set num_clients to "
            f"{len(slices.sites)}, or config.data.ct.sites='patients' to deal patients into "
            "num_clients sites."
        )
    slices = pad_to_multiple(slices, ct.pad_multiple)
    splits = manifest_splits(slices, cases) if cases else None
    if splits is None:
        splits = patient_splits(
            slices, config.partition.heldout_fraction, ct.test_fraction, config.seed
        )
    labels = slices.mask[slices.mask != IGNORE_LABEL]
    num_classes = config.task.num_classes or max(2, int(labels.max(initial=0)) + 1)
    fed = federate_slices(slices, splits, num_classes=num_classes, name=config.data.name)
    logging.info(
        "CT data %s: %d sites, %d patients, %d slices of %dx%d; train/heldout/test slices %d/%d/%d",
        config.data.name,
        len(slices.sites),
        len(np.unique(slices.patient)),
        slices.num_slices,
        *slices.image.shape[1:3],
        *(len(splits[k]) for k in ("train", "heldout", "test")),
    )
    return _shifted(config, fed, is_3d=False, label_keys=("mask",))


def _shifted(
    config: ml_collections.ConfigDict,
    fed: FederatedData,
    *,
    is_3d: bool,
    label_keys: tuple[str, ...] = (),
) -> FederatedData:
    """``fed`` with ``config.heterogeneity``'s scanner shift on every client's data.

    The same scanner shifts a client's training and held-out data (different noise draws);
    the global test split stays unshifted: it measures transfer to an unseen site.
    """
    shifts = build_shifts(config, is_3d=is_3d)
    if all(s.is_identity for s in shifts):
        return fed
    kw = dict(seed=config.seed, label_keys=label_keys, ignore_label=IGNORE_LABEL)
    return fed._replace(
        train=apply_to_clients(fed.train, shifts, stream=TRAIN_STREAM, **kw),
        heldout=apply_to_clients(fed.heldout, shifts, stream=HELDOUT_STREAM, **kw),
    )


def build_shifts(config: ml_collections.ConfigDict, *, is_3d: bool) -> list[AcquisitionShift]:
    """Per-client acquisition shifts from ``config.heterogeneity`` (identity if absent).

    Fields: ``clients`` (a list of per-client dicts, explicit), else ``preset`` (e.g.
    ``"pppml_hmi"``: slice thickness 1/5/10), else ``strength`` > 0 (drawn per client from
    ``seed``, default the run's seed). See :mod:`jaxfl.data.heterogeneity`.
    """
    h = config.get("heterogeneity")
    spec = None
    if h is not None and h.get("clients"):
        spec = [dict(c) for c in h.clients]
    elif h is not None and h.get("preset"):
        spec = {"preset": h.preset, "slice_mode": h.get("slice_mode", "pad")}
    elif h is not None and h.get("strength"):
        seed = h.get("seed", -1)
        spec = {
            "strength": h.strength.to_dict() if hasattr(h.strength, "to_dict") else h.strength,
            "seed": config.seed if seed is None or seed < 0 else seed,
            "slice_mode": h.get("slice_mode", "pad"),
        }
    return shifts_from_config(spec, config.num_clients, is_3d=is_3d, seed=config.seed)


def clients_per_round(config: ml_collections.ConfigDict) -> int | float:
    """The simulator's sampling spec: ``client_fraction`` if set, else the count (0 = all)."""
    return config.client_fraction if config.client_fraction else config.clients_per_round


def poisson_rate(config: ml_collections.ConfigDict) -> float | None:
    """The Poisson client-sampling rate, or None for fixed-size sampling."""
    return config.client_fraction if config.client_sampling == "poisson" else None


def build_optimizer(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """An optax optimizer from ``{optimizer, learning_rate, momentum?, weight_decay?}``."""
    if opt.optimizer == "sgd":
        return optax.sgd(opt.learning_rate, momentum=opt.get("momentum") or None)
    if opt.optimizer == "adam":
        return optax.adam(opt.learning_rate)
    if opt.optimizer == "adamw":
        return optax.adamw(opt.learning_rate, weight_decay=opt.get("weight_decay", 1e-4))
    raise ValueError(f"optimizer {opt.optimizer!r}; choose one of {OPTIMIZERS}.")


def build_algorithm(
    config: ml_collections.ConfigDict,
    model,
    privacy: PrivacyPlan | None = None,
    task: Task = CLASSIFICATION,
) -> FederatedAlgorithm:
    """The federated algorithm named by ``config.algorithm.name`` for a flax ``model``."""
    loss = make_loss(task, model.apply)
    client_opt = build_optimizer(config.local)
    server_opt = build_optimizer(config.server)
    kw = dict(batch_size=config.local.batch_size, epochs=config.local.epochs)
    if privacy is not None:
        kw.update(dp=privacy.dp_sgd, update_dp=privacy.update_dp)
    name = config.algorithm.name
    if name == "fedavg":
        return fedavg(loss, client_opt, server_opt, **kw)
    if name == "fedprox":
        return fedprox(loss, client_opt, server_opt, mu=config.algorithm.mu, **kw)
    if name == "ditto":
        return ditto(loss, client_opt, server_opt, lam=config.algorithm.lam, **kw)
    if name == "scaffold":
        if privacy is not None and privacy.update_dp:
            raise ValueError(
                f"SCAFFOLD with dp.mode={privacy.mode!r}: update-level DP would clip and noise "
                "the model update but not the control variates; use dp.mode='record'."
            )
        return scaffold(
            loss,
            server_opt,
            learning_rate=config.local.learning_rate,
            batch_size=config.local.batch_size,
            epochs=config.local.epochs,
            num_clients=config.num_clients,
            dp=privacy.dp_sgd if privacy is not None else None,
        )
    if name.startswith("perfedavg_") and name in ALGORITHMS:
        if privacy is not None and privacy.update_dp:
            raise ValueError(
                f"Per-FedAvg with dp.mode={privacy.mode!r}: update-level DP clips and noises "
                "FedAvg-style updates; use dp.mode='record' (DP-SGD on every Per-FedAvg batch)."
            )
        return perfedavg(
            loss,
            server_opt,
            batch_size=config.local.batch_size,
            epochs=config.local.epochs,
            alpha=config.algorithm.alpha,
            beta=config.algorithm.beta,
            variant=name.removeprefix("perfedavg_"),
            dp=privacy.dp_sgd if privacy is not None else None,
        )
    if name == "local":
        raise ValueError("algorithm 'local' has no federated algorithm; use build_runner.")
    raise ValueError(f"config.algorithm.name={name!r}; choose one of {ALGORITHMS}.")


def client_program(
    config: ml_collections.ConfigDict,
    task: Task,
    model,
    train: ClientArrays,
    algorithm: FederatedAlgorithm | None,
) -> tuple[ClientFn, Any, Any]:
    """``(fn, shared, per_client)``: the simulator's per-client function of ``algorithm``
    (:func:`~jaxfl.simulate.client_contribution`), the shapes of what it broadcasts (``(model,
    client stream key, round)``) and of what it maps over ``[K, ...]`` (the client rows of
    ``train``, with every client's state for a stateful algorithm); nothing is initialized or
    read.

    For the local-only baseline (``algorithm`` None) it is FedAvg's client update with
    ``config.local``'s optimizer, what LocalOnly trains each client with.
    """
    if algorithm is None:
        algorithm = fedavg(
            make_loss(task, model.apply),
            build_optimizer(config.local),
            build_optimizer(config.server),
            batch_size=config.local.batch_size,
            epochs=config.local.epochs,
        )
    shape = train.examples[task.input_key].shape[2:]
    key = jax.random.key(0)
    params = jax.eval_shape(lambda: model.init(key, jnp.zeros((1, *shape), jnp.float32))["params"])
    state = jax.eval_shape(algorithm.init, params)
    shared = (
        jax.eval_shape(algorithm.broadcast, state),
        jax.eval_shape(lambda: key),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    k = train.num_clients
    per_client = shapes_of(client_rows(train))
    if algorithm.stateful:
        one = jax.eval_shape(algorithm.client_init, params)
        states = jax.tree.map(lambda s: jax.ShapeDtypeStruct((k, *s.shape), s.dtype), one)
        per_client = (per_client, states)
    return client_contribution(algorithm), shared, per_client


def resolve_chunk_size(
    config: ml_collections.ConfigDict,
    train: ClientArrays,
    placement: str,
    program: tuple[ClientFn, Any, Any] | None,
    devices: Sequence[jax.Device],
    per_round: int | None = None,
) -> int:
    """``config.chunk_size``, or for 0 the largest chunk whose XLA memory estimate fits
    ``config.memory_limit_gb`` (:func:`jaxfl.memory.auto_chunk_size`; with ``placement``
    ``"device"`` the resident client data counts against the cap too). ``program``:
    :func:`client_program`'s ``(fn, shared, per_client)``, needed only for 0; ``per_round``:
    the clients a round runs (default all), the most a chunk needs. Strategies that use no chunk
    (``vmap``, ``scan``, ``loop``, ``shard_map`` with ``scan`` within devices) on resident data
    get 1 without compiling anything."""
    if config.chunk_size:
        return int(config.chunk_size)
    strategy = resolve_strategy(config.strategy, devices)
    chunked = strategy == "chunked" or (strategy == "shard_map" and devices[0].platform != "cpu")
    if placement == "device" and not chunked:
        logging.info("config.chunk_size=0: strategy %s on resident data uses no chunk", strategy)
        return 1
    if program is None:
        raise ValueError("chunk_size=0 (automatic) needs the client program to estimate")
    fn, shared, per_client = program
    cap = memory_cap_bytes(float(config.get("memory_limit_gb", 0.0)), devices[0])
    # Resident data: every client's rows (and state), which stay on the device between chunks.
    resident = tree_nbytes(per_client) if placement == "device" else 0
    limit = per_round or train.num_clients
    chunk, _ = auto_chunk_size(fn, shared, per_client, cap, limit=limit, resident_bytes=resident)
    # Streaming over a sharded backend splits each chunk between the devices.
    if placement == "stream":
        chunk = min(per_device_chunk(chunk, devices, strategy == "shard_map"), limit)
    return chunk


def build_backend(
    config: ml_collections.ConfigDict,
    train: ClientArrays,
    program: tuple[ClientFn, Any, Any] | None = None,
    per_round: int | None = None,
) -> ClientBackend:
    """The execution backend of ``config.strategy`` (and ``config.chunk_size``, 0 = chosen
    from ``program``'s memory, :func:`resolve_chunk_size`), streaming ``train`` from the host
    when ``config.placement`` says so (``auto``: by its size)."""
    placement = data_placement(config, train)
    chunk = resolve_chunk_size(config, train, placement, program, jax.devices(), per_round)
    backend = make_backend(config.strategy, chunk_size=chunk)
    if placement == "device":
        return backend
    streaming = StreamingBackend(backend, chunk)
    logging.info(
        "Client data (%.2f GiB) stays on the host; %d clients at a time go to the device",
        tree_nbytes(train) / 2**30,
        streaming.chunk,
    )
    return streaming


def build_host_aggregator(
    config: ml_collections.ConfigDict, counts: np.ndarray
) -> HostAggregator | None:
    """The secure aggregator named by ``config.secure.aggregator`` (None for ``plain``).

    Client weights are example counts, which FedAvg treats as public; ``max_weight = 0`` uses
    the largest client's count as the public bound every client pre-scales by.
    """
    sec = config.get("secure")
    if sec is None or sec.aggregator == "plain":
        return None
    max_weight = float(sec.max_weight or np.max(counts))
    if sec.aggregator == "secagg":
        opts = sec.secagg.to_dict()
        opts["neighbours"] = opts["neighbours"] or None  # 0 = complete graph
        if opts["threshold"] > 1:  # a count (ml_collections keeps the field a float)
            opts["threshold"] = int(round(opts["threshold"]))
        return make_host_aggregator(
            "secagg",
            seed=config.seed,
            max_weight=max_weight,
            secure_randomness=bool(config.get("secure_randomness", False)),
            **opts,
        )
    opts = sec.ckks.to_dict()
    sigma = opts.pop("ring_sigma")
    if sec.aggregator == "ckks_ring":
        opts["sigma"] = sigma
    return make_host_aggregator(sec.aggregator, seed=config.seed, max_weight=max_weight, **opts)


def build_runner(
    config: ml_collections.ConfigDict,
    task: Task,
    model,
    train: ClientArrays,
    privacy: PrivacyPlan | None,
    sampling: int | float,
    rate: float | None,
) -> tuple[Simulator | LocalOnly, FederatedAlgorithm | None]:
    """The round runner: a :class:`Simulator` over the algorithm, or :class:`LocalOnly`."""
    auto = not config.chunk_size  # the chunk size is chosen from the client program's memory
    # A Poisson round runs every client's slot; a fixed-size one its sampled clients.
    local = config.algorithm.name == "local"  # local-only training runs every client
    k = train.num_clients
    per_round = k if rate or local else num_sampled_clients(sampling, k)
    if local:
        program = client_program(config, task, model, train, None) if auto else None
        runner = LocalOnly(
            make_loss(task, model.apply),
            build_optimizer(config.local),
            train,
            batch_size=config.local.batch_size,
            epochs=config.local.epochs,
            seed=config.seed,
            backend=build_backend(config, train, program, per_round),
            task=task,
        )
        return runner, None
    algorithm = build_algorithm(config, model, privacy, task)
    program = client_program(config, task, model, train, algorithm) if auto else None
    sim = Simulator(
        algorithm,
        train,
        seed=config.seed,
        backend=build_backend(config, train, program, per_round),
        clients_per_round=sampling,
        poisson_rate=rate,
        host_aggregator=build_host_aggregator(config, np.asarray(train.counts)),
        secure_randomness=bool(config.get("secure_randomness", False)),
        task=task,
    )
    return sim, algorithm


def build_personalized_eval(
    config: ml_collections.ConfigDict, task: Task, model, backend: ClientBackend
) -> PersonalizedEval | None:
    """Adapt-then-test evaluation from ``config.personalization`` (None when disabled), mapping
    clients through ``backend`` (the runner's)."""
    p = config.get("personalization")
    if p is None or not p.enabled or config.algorithm.name == "local":
        return None
    return make_personalized_eval(
        make_loss(task, model.apply),
        model.apply,
        adapt_steps=p.adapt_steps,
        adapt_lr=p.adapt_lr,
        batch_size=config.local.batch_size,
        seed=config.seed,
        backend=backend,
        task=task,
    )


def init_params(model, sample_images: jax.Array, key: jax.Array):
    """Initialize ``model``'s params for inputs shaped like one example of ``sample_images``.

    One jitted program, not flax's eager init: eagerly every parameter's random draw compiles
    its own small program (on a 2-core CPU a U-Net's init took 30-36 s eagerly, 4-8 s jitted).
    It runs once, so on CPU it is compiled at LLVM optimization level 1, which compiles 2.2-2.4×
    faster than the default and gives bit-identical parameters (tested against eager init).
    Only ``params`` leave the program, so other collections are not computed.
    """
    example = jnp.zeros((1, *sample_images.shape[1:]), jnp.float32)
    options = {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else {}
    init = jax.jit(lambda k, x: model.init(k, x)["params"])
    params = init.lower(key, example).compile(compiler_options=options)(key, example)
    logging.info(
        "Model %s: %d parameters",
        type(model).__name__,
        sum(x.size for x in jax.tree.leaves(params)),
    )
    return params


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The flax model named by ``config.model.name``."""
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    return get_model(config.model.name, num_classes, **kwargs)


class Simulation(NamedTuple):
    """Everything a run of ``config`` is built from: its data, task, model, privacy plan, round
    runner (with its algorithm; None for local-only) and the initial global ``params``."""

    fed: FederatedData
    task: Task
    model: Any
    privacy: PrivacyPlan
    runner: Simulator | LocalOnly
    algorithm: FederatedAlgorithm | None
    params: Any


def build_simulation(
    config: ml_collections.ConfigDict,
    fed: FederatedData,
    *,
    noise_history: Sequence[float] = (),
    privacy: PrivacyPlan | None = None,
) -> Simulation:
    """The run of ``config`` over ``fed``: privacy planned for its clients (``noise_history``:
    the noise of rounds a resumed run already ran), or the given ``privacy`` plan (an audit's
    variant of it), then the runner and the initial params (from the seed's init stream)."""
    task = build_task(config, fed)
    model = build_model(config, fed.num_classes)
    sampling = clients_per_round(config)
    rate = poisson_rate(config)
    if privacy is None:
        privacy = plan_privacy(
            config,
            np.asarray(fed.train.counts),
            num_sampled_clients(sampling, config.num_clients),
            poisson_rate=rate,
            history=noise_history,
        )
    runner, algorithm = build_runner(config, task, model, fed.train, privacy, sampling, rate)
    init_key = jax.random.fold_in(jax.random.key(config.seed), INIT_STREAM)
    params = init_params(model, fed.train.examples[task.input_key][0], init_key)
    return Simulation(fed, task, model, privacy, runner, algorithm, params)
