"""Segmentation smoke test: FedAvg, a small U-Net, synthetic CT phantoms; ~75 s on 2 CPU cores.

Five sites (one client each), each a different simulated scanner (HU offset, noise, blur,
resolution, slice thickness: ``jaxfl/data/phantoms.py``), four phantom patients per site split
by patient into training, held-out and test. The task is infection segmentation (label 1 in
the lungs); Dice is scored per patient volume.

  python -m experiments.run --config=configs/seg_debug.py --workdir=/tmp/jaxfl_seg_debug
"""

import ml_collections

from configs import debug


def get_config() -> ml_collections.ConfigDict:
    config = debug.get_config()
    config.task.name = "segmentation"
    config.task.loss = "ce+dice"
    config.data.source = "ct_phantoms"
    config.data.name = "ct_phantoms"
    config.data.ct.patients_per_site = 4
    config.data.ct.num_slices = 12
    config.data.ct.phantom_size = (64, 64)
    config.data.ct.lung_only = True
    config.data.ct.test_fraction = 0.25
    config.data.ct.pad_multiple = 8
    config.partition.heldout_fraction = 0.25
    config.num_clients = 5
    config.model = ml_collections.ConfigDict(dict(name="unet", base_features=8, depth=3, groups=4))
    config.local.optimizer = "adam"
    config.local.learning_rate = 3e-3
    config.local.batch_size = 8
    config.local.epochs = 3
    config.rounds = 20
    config.eval_batch_size = 32
    return config
