"""PPPML-HMI's 3D CT classification: RAD-ChestCT, 3 hospitals, slice thickness 1/5/10, DenseNet.

RAD-ChestCT (Draelos et al. 2021, Zenodo record 6406114) read from ``data.data_dir``: the three
label tables (``imgtrain_/imgvalid_/imgtest_Abnormality_and_Location_Labels.csv``) are the
three hospitals, as in PPPML-HMI's code; each scan (``<NoteAcc_DEID>.npz``, HU) is clipped to
[-1000, 200] HU and resampled to 70^3; the label is "any abnormality"
(``--config.data.volume.abnormality=nodule`` for one finding). Hospital i's scanner averages
1 / 5 / 10 adjacent slices and zero-pads back to 70 (``heterogeneity.preset="pppml_hmi"``).
Each hospital keeps 20% of its scans as held-out (PPPML-HMI's 80/20 local split) and gives 20%
to the global test split. The model is DenseNet-121 in 3D (k = 32, blocks 6-12-24-16; GroupNorm
instead of BatchNorm, see ``jaxfl/models/densenet.py``): a GPU workload. The compact network
that trains on a CPU: ``--config.model.growth_rate=8 --config.model.block_config='(2,2,2)'
--config.model.init_features=16``.

  python -m experiments.sweep --config=configs/radchest_3d.py --workdir=runs/radchest \\
      --sweep='algorithm=fedavg,perfedavg_pppml,local' --config.data.data_dir=/path/to/radchest

CKKS with PPPML-HMI's cyclic ring: ``--config.secure.aggregator=ckks_ring``. Preprocessed
volumes are cached (memory-mapped) in ``data.volume.cache_dir``; the first run reads every
scan once.
"""

import ml_collections

from configs import debug


def get_config() -> ml_collections.ConfigDict:
    config = debug.get_config()
    config.data.source = "radchest"
    config.data.name = "radchest"
    config.data.volume.shape = (70, 70, 70)
    config.data.volume.cache_dir = "~/.cache/jaxfl/radchest"
    config.data.volume.sites = "data"
    config.task.num_classes = 2
    config.num_clients = 3
    config.partition.heldout_fraction = 0.2
    config.heterogeneity.preset = "pppml_hmi"
    config.model = ml_collections.ConfigDict(
        dict(name="densenet", growth_rate=32, block_config=(6, 12, 24, 16), init_features=32)
    )
    config.local.batch_size = 8
    config.local.epochs = 1
    config.local.learning_rate = 1e-3
    config.algorithm.name = "perfedavg_pppml"
    config.algorithm.alpha = 1e-2  # PPPML-HMI's RAD-ChestCT step sizes
    config.algorithm.beta = 1e-3
    config.personalization.enabled = True
    config.personalization.adapt_steps = 1
    config.personalization.adapt_lr = 1e-2
    config.rounds = 20
    config.eval_every = 1
    config.eval_batch_size = 16
    return config
