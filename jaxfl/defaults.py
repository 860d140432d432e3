"""The config schema: every field jaxfl knows, with its default and what it does.

``configs/debug.py`` is exactly these defaults; every shipped config starts from them. A field
that is not here (a typo such as ``local.learnig_rate``) is refused by
:func:`jaxfl.validate.validate_config`, with the closest known name.
"""

from __future__ import annotations

from typing import Any

import ml_collections

# Fields a config may add although the defaults leave them out (they change nothing unset):
# partition.seed pins the split independently of `seed`; heterogeneity.clients lists per-client
# shift dicts.
# model.base_features/depth/groups are the U-Net's widths (jaxfl.models.UNet); growth_rate,
# block_config, init_features, bn_size, compression, hidden, norm and stem_kernel the DenseNet's
# (jaxfl.models.DenseNet; DenseNet-121: growth_rate 32, block_config (6, 12, 24, 16)); hidden
# and activation the MLP's, per_pixel its segmentation output (jaxfl.models.MLP).
OPTIONAL_FIELDS = (
    "partition.seed",
    "heterogeneity.clients",
    "model.base_features",
    "model.depth",
    "model.groups",
    "model.growth_rate",
    "model.block_config",
    "model.init_features",
    "model.bn_size",
    "model.compression",
    "model.hidden",
    "model.norm",
    "model.stem_kernel",
    "model.activation",
    "model.per_pixel",
)


def flatten_fields(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict (``config.to_dict()``, ``config.json``) as ``{"a.b.c": leaf}``."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten_fields(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def default_config() -> ml_collections.ConfigDict:
    """Every config field with its default (the debug experiment); comments say what each does."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict(
        dict(
            # classification: "synthetic", "medmnist", or CT volumes (config.data.volume):
            # "radchest" (RAD-ChestCT in data_dir) or "volume_csv"; segmentation (config.data.ct):
            # "ct_phantoms", "covid19_ct_seg", "msd", "ct_manifest" or "totalseg_example"
            source="synthetic",
            name="synthetic",
            # medmnist only: folder holding the .npz; empty = $JAXFL_DATA_DIR or ~/.medmnist
            data_dir="",
            size=28,
            fallback="",  # medmnist only: "synthetic" = synthetic data if the file is missing
            num_classes=4,
            image_shape=(28, 28, 1),
            n_train=1200,
            n_val=100,
            n_test=400,
            noise=0.1,
        )
    )
    # CT slices for segmentation (jaxfl/data/ct.py). Sites are clients: config.num_clients
    # must equal the number of sites (sites="patients" deals patients into num_clients sites).
    config.data.ct = ml_collections.ConfigDict(
        dict(
            # ct_phantoms: synthetic CT, one scanner protocol per site (jaxfl/data/phantoms.py)
            patients_per_site=4,
            num_slices=16,
            phantom_size=(64, 64),
            # ct_manifest: the CSV (image, mask, patient, site[, split, lung]); msd: folders of
            # nnU-Net datasets, one per site; covid19_ct_seg / totalseg_example: data.data_dir
            manifest="",
            msd_dirs=(),
            sites="data",  # "data": the layout's sites; "patients": deal patients into sites
            lung_masks=False,  # covid19_ct_seg: attach Lung_Mask files (for lung_only)
            # preprocessing (jaxfl.data.ct.CTPreprocess; part of the cache key)
            size=(),  # in-plane (H, W) to resample to; () keeps each file's size
            window_level=-600.0,
            window_width=1500.0,
            intensity="auto",  # "auto" (detect HU vs 0-255), "hu" or "grey"
            label_map=(),  # ((raw, class), ...): labels not listed become 0; () keeps labels
            lung_only=False,
            lung_labels=(),
            cache_dir="",  # preprocessed slices cached here as .npz; "" = no cache
            test_fraction=0.2,  # patients per site in the global test split
            pad_multiple=16,  # pad H, W to this multiple (2**depth of the U-Net); ignored pixels
        )
    )
    # CT volumes for 3D classification (jaxfl/data/volumes.py): resampled to `shape` with HU
    # clipped to `hu_window`, then onto [-1, 1].
    config.data.volume = ml_collections.ConfigDict(
        dict(
            shape=(70, 70, 70),
            hu_window=(-1000.0, 200.0),
            intensity="auto",  # "auto" (detect HU vs 0-255), "hu" or "grey"
            abnormality="",  # radchest: "" = any abnormality, else one finding ("nodule")
            csv="",  # volume_csv: CSV with columns image, label[, site, split]
            # "data": one client per site (RAD-ChestCT: its 3 label tables, PPPML-HMI's split);
            # "partition": pool the volumes and split them with config.partition
            sites="data",
            test_fraction=0.2,  # of each site's volumes into the global test split
            cache_dir="",  # preprocessed volumes cached (memory-mapped .npy) here; "" = none
        )
    )
    # True: every privacy-relevant draw (DP noise, Poisson samples of examples and clients,
    # SecAgg+ rounding) comes from the OS CSPRNG, not from `seed`, so the logged config cannot
    # recompute it; runs are then not reproducible. The CKKS ring's mask always does.
    config.secure_randomness = False
    config.num_clients = 8
    config.partition = ml_collections.ConfigDict(
        dict(name="dirichlet", alpha=1.0, sigma=1.0, classes_per_client=2, heldout_fraction=0.2)
    )
    # What is learned and how it is scored (jaxfl/tasks): "classification" or "segmentation"
    # (segmentation: num_classes 0 = from the data's labels; loss "ce", "dice" or "ce+dice";
    # class_weights one per class for the cross-entropy, () = unweighted; balanced_weights:
    # inverse pixel frequency of the pooled training masks, PPPML-HMI's (1, 524.46) form).
    config.task = ml_collections.ConfigDict(
        dict(
            name="classification",
            num_classes=0,
            loss="ce+dice",
            class_weights=(),
            balanced_weights=False,
            dice_eps=1.0,
        )
    )
    config.model = ml_collections.ConfigDict(dict(name="cnn"))
    # fedavg | fedprox (mu) | perfedavg_fo | perfedavg_hf | perfedavg_pppml (alpha: inner
    # adaptation step, beta: outer step; plain SGD, config.local's optimizer is not used) |
    # scaffold (control variates; local SGD with config.local.learning_rate) | ditto (a
    # personal model per client, pulled to the global one with weight lam) | local
    # (local-only baseline: every client trains alone)
    config.algorithm = ml_collections.ConfigDict(
        dict(name="fedavg", mu=0.01, alpha=1e-2, beta=1e-3, lam=0.1)
    )
    config.local = ml_collections.ConfigDict(
        dict(optimizer="adam", learning_rate=3e-3, momentum=0.0, batch_size=32, epochs=2)
    )
    config.server = ml_collections.ConfigDict(dict(optimizer="sgd", learning_rate=1.0))
    config.dp = ml_collections.ConfigDict(
        dict(
            mode="none",  # none | record (DP-SGD) | local_update | user_level (DP-FedAvg)
            clip_norm=1.0,  # per-example (record) or per-update L2 bound C
            noise_multiplier=1.0,  # noise std = noise_multiplier * C; used if target_epsilon=0
            target_epsilon=0.0,  # > 0: calibrate the noise multiplier for the whole run
            delta=1e-5,
            accountant="rdp",  # rdp | pld (dp-accounting)
            microbatch_size=32,  # record mode: per-example gradients computed this many at once
            # record mode: per-example gradients all at once ("vmap") or one at a time ("scan",
            # faster on CPU); "auto" picks by backend. Same result either way.
            per_example="auto",
            per_round_epsilon=0.0,  # local_update: > 0 calibrates each round to this epsilon
            seed_as_coded=False,  # local_update: Flower LocalDpMod noise (sensitivity 1)
            seed_epsilon=6.0,  # ...with this per-round epsilon, as the BloodMNIST code does
            # A resume that raises `rounds` past what target_epsilon allows is refused unless
            # this is True (then the reported epsilon exceeds the target).
            allow_exceeding_budget=False,
        )
    )
    # Simulated scanner heterogeneity (jaxfl/data/heterogeneity.py), applied to each client's
    # training and held-out data: `strength` in [0, 1] draws per-client shifts from `seed`
    # (-1 = the run's seed); `preset="pppml_hmi"` gives 3D slice thickness 1/5/10; a config
    # file may instead set `clients` to a list of per-client dicts.
    config.heterogeneity = ml_collections.ConfigDict(
        dict(strength=0.0, seed=-1, preset="", slice_mode="pad")
    )
    # Adapt-then-test: each client takes adapt_steps SGD steps of size adapt_lr on its own
    # training data from the global model, then is tested on its held-out split.
    config.personalization = ml_collections.ConfigDict(
        dict(enabled=False, adapt_steps=1, adapt_lr=1e-2)
    )
    # Secure aggregation on the host (jaxfl/secure): plain (in-jit weighted mean) | secagg
    # (SecAgg+) | ckks (CKKS sum by the server) | ckks_ring (PPPML-HMI's cyclic ring).
    config.secure = ml_collections.ConfigDict(
        dict(
            aggregator="plain",
            max_weight=0.0,  # public bound on client weights; 0 = the largest client's count
            secagg=dict(
                threshold=0.66,  # Shamir t: an int, or a fraction of the k + 1 shares
                neighbours=0,  # k; 0 = complete graph, else an even number >= 4
                clip_range=8.0,  # Flower's SecAgg+ defaults: clip to +-8, 2^22 levels, mod 2^32
                quantization_bits=22,
                modulus_bits=32,
                dropout_probs=(0.0, 0.0, 0.0),  # per stage: keys, shares, masked input
            ),
            ckks=dict(
                poly_modulus_degree=8192,
                coeff_mod_bit_sizes=(60, 60),
                global_scale_bits=40,
                symmetric=True,
                ring_sigma=1e4,  # ckks_ring: std of the initiator's mask R (PPPML-HMI)
            ),
        )
    )
    # The privacy audit (python -m experiments.attack; jaxfl/attacks/report.py): what is
    # attacked, in order (jaxfl.attacks.report.PROTECTIONS), the gradient inversion
    # (jaxfl.attacks.AttackConfig; PPPML-HMI's iDLG: Adam lr 0.1, 900 steps), the DP of the
    # protected rows, and how much evidence the membership and epsilon audits gather.
    config.attack = ml_collections.ConfigDict(
        dict(
            protections=(
                "none",
                "none_aggregate",
                "record_dp",
                "local_update_dp",
                "user_level_dp",
                "secagg",
                "ckks",
                "broken_dp",
            ),
            method="idlg",
            steps=900,
            learning_rate=0.1,
            tv_weight=1e-4,
            restarts=4,
            batch=1,  # images per client in the attacked round
            noise_multiplier=1.0,
            clip_norm=1.0,
            audit_trials=2000,  # per world, for the empirical epsilon
            mia_rounds=20,  # rounds trained before membership inference
        )
    )
    config.rounds = 10
    config.clients_per_round = 0  # clients sampled each round; 0 = all
    config.client_fraction = 0.0  # or a fraction of clients in (0, 1]; 0 = use clients_per_round
    # "fixed": exactly that many clients a round; "poisson": each client independently with
    # probability client_fraction (what user-level DP accounting assumes; random count).
    config.client_sampling = "fixed"
    config.strategy = "auto"  # auto | vmap | chunked | scan | loop | shard_map (jaxfl.backends)
    # Several processes (hosts, or several on one machine) as one simulation on jax.distributed
    # (jaxfl.distributed): the shard_map mesh spans every process's devices. Left empty, the
    # address, process count and id come from the cluster (SLURM, Open MPI, TPU); results are
    # the same as one process's.
    config.distributed = ml_collections.ConfigDict(
        dict(enabled=False, coordinator_address="", num_processes=0, process_id=-1)
    )
    # Clients vmapped together by "chunked" (per device under shard_map on accelerators), and
    # sent to the device at a time when data streams. 0 = automatic: the largest chunk whose
    # memory, as XLA's compiler reports it for the client program at chunks of 1 and 2
    # (jaxfl.memory), fits memory_limit_gb (streaming: the chunk's data, model, optimizer
    # state and activations; device placement: that plus all client data, resident).
    config.chunk_size = 64
    # The memory a chunk may use with chunk_size = 0, in GiB; 0 = half the device's memory
    # (jaxfl.memory.MEMORY_FRACTION of the allocator limit on accelerators, of RAM on CPU).
    config.memory_limit_gb = 0.0
    # Where client data lives: "device" (all of it, once), "stream" (on the host; chunk_size
    # clients at a time go to the device) or "auto" (stream when it would fill more than half
    # of the device's memory; jaxfl.backends.choose_placement).
    config.placement = "auto"
    config.eval_every = 1
    config.eval_batch_size = 256
    config.checkpoint_every = 5  # rounds; the last round is always saved
    return config
