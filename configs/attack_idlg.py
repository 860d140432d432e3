"""Privacy audit, PPPML-HMI's iDLG demonstration on BreastMNIST: every protection attacked.

8 hospitals (IID) each holding one BreastMNIST ultrasound image for the inversion (iDLG with the
reference code's Adam lr 0.1, 900 steps; 4 restarts), through a sigmoid MLP (784-256-2, DLG's
smooth setting) trained with one plain SGD step per image. Per protection: PSNR/SSIM of the
reconstruction, membership inference after `attack.mia_rounds` rounds, and for DP the
accountant's epsilon next to the audited lower bound. Minutes on 2 CPU cores:
  python -m experiments.attack --config=configs/attack_idlg.py --workdir=runs/attack
Needs breastmnist.npz in $JAXFL_DATA_DIR (or --config.data.fallback=synthetic).
"""

import ml_collections

from configs import debug


def get_config() -> ml_collections.ConfigDict:
    config = debug.get_config()
    config.data.source = "medmnist"
    config.data.name = "breastmnist"
    config.num_clients = 8
    config.partition.name = "iid"
    config.partition.heldout_fraction = 0.0
    config.model = ml_collections.ConfigDict(dict(name="mlp", hidden=(256,), activation="sigmoid"))
    # config.attack's defaults (jaxfl/defaults.py) are this audit's settings.
    return attacked_training(config)


def attacked_training(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DLG's training setting, shared by the attack configs: one plain SGD step (lr 0.1) per
    example, every client in one vmapped round, delta 1e-5 for the DP rows, and personalization
    by 5 SGD steps for the membership attacks."""
    config.local.optimizer = "sgd"
    config.local.learning_rate = 0.1
    config.local.batch_size = 1
    config.local.epochs = 1
    config.strategy = "vmap"
    config.rounds = 1
    config.dp.delta = 1e-5
    # Record-level DP-SGD at batch 1 samples about one example a step: per-example gradients
    # one at a time, not in micro-batches of 32 (the same result, 30x less work).
    config.dp.microbatch_size = 1
    config.personalization.adapt_steps = 5
    config.personalization.adapt_lr = 0.1
    return config
