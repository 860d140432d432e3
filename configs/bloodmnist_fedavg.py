"""Fares & Saad 2024 (non-private baseline): FedAvg + DPResNet on BloodMNIST.

Their code: 50 rounds, every client every round, 3 local epochs of Adam (lr 1e-3, re-created each
round) with batch 32, the paper's quantity-skew split (numpy seed 42), 80/20 local train/val,
global evaluation on the official test split after every round. Set ``num_clients`` to 5, 10
or 20 as in the paper:

  python -m experiments.run --config=configs/bloodmnist_fedavg.py --workdir=runs/blood10 \
      --config.num_clients=10 --config.data.data_dir=/path/to/medmnist

Their SecAgg+ runs: add ``--config.secure.aggregator=secagg`` (Flower's SecAggPlusWorkflow with
num_shares 5 = 4 neighbours + self, reconstruction threshold 4, max_weight 10000, set below).

Needs ``bloodmnist.npz`` (official MedMNIST v2 file); the error message says where to get it.
"""

import ml_collections

from configs import debug


def get_config() -> ml_collections.ConfigDict:
    config = debug.get_config()
    config.seed = 0
    config.data.source = "medmnist"
    config.data.name = "bloodmnist"
    config.data.size = 28
    config.num_clients = 10
    # Their per-client split rounds the train count down (int(0.8 n)); ours rounds it up, so a
    # client may hold one more training example than in their code.
    config.partition.name = "bloodmnist_paper"
    config.partition.seed = 42
    config.partition.heldout_fraction = 0.2
    config.model.name = "dpresnet"
    config.algorithm.name = "fedavg"
    config.local.optimizer = "adam"
    config.local.learning_rate = 1e-3
    config.local.batch_size = 32
    config.local.epochs = 3
    config.server.optimizer = "sgd"
    config.server.learning_rate = 1.0
    config.rounds = 50
    config.clients_per_round = 0
    config.client_fraction = 0.0
    config.eval_every = 1
    config.checkpoint_every = 1
    config.secure.secagg.neighbours = 4
    config.secure.secagg.threshold = 4
    config.secure.max_weight = 10000.0
    return config
