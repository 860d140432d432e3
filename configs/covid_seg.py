"""PPPML-HMI's COVID-19 CT lung-infection segmentation: 2D U-Net, 5 hospitals, per-site Dice.

COVID-19-CT-Seg (Ma et al. 2020, Zenodo 3757476: 20 volumes, 10 "coronacases" in HU and 10
Radiopaedia stored as 0-255 grey levels, detected per volume) with the patients dealt into five
hospitals (``data.ct.sites = "patients"``: four patients each, split by patient into training,
held-out and test). Slices are resampled to 128x128, lung-windowed, and only slices with lung
are kept (the Lung_Mask files). The U-Net has PPPML-HMI's 16 base features, GroupNorm instead
of BatchNorm; the loss is their class-balanced pixel cross-entropy, weights from the pooled
training masks (their (1.0, 524.46) is this for 0.19% infection pixels).

Compare algorithms (personalized Dice per hospital is logged as ``personalized_dice``):

  python -m experiments.sweep --config=configs/covid_seg.py --workdir=runs/covid_seg \
      --sweep='algorithm=fedavg,perfedavg_fo,local' --config.data.data_dir=/path/to/covid19

CKKS ring aggregation (PPPML-HMI's): add ``--config.secure.aggregator=ckks_ring``.

Needs the unzipped COVID-19-CT-Seg_20cases.zip, Infection_Mask.zip and Lung_Mask.zip under
``data.data_dir``; the error message gives the download and the layout. Without the files,
``configs/seg_debug.py`` runs the same pipeline on synthetic phantoms.
"""

import ml_collections

from configs import debug


def get_config() -> ml_collections.ConfigDict:
    config = debug.get_config()
    config.seed = 0
    config.task.name = "segmentation"
    config.task.num_classes = 2
    config.task.loss = "ce"
    config.task.balanced_weights = True
    config.data.source = "covid19_ct_seg"
    config.data.name = "covid19_ct_seg"
    config.data.ct.lung_masks = True
    config.data.ct.lung_only = True
    config.data.ct.size = (128, 128)
    config.data.ct.sites = "patients"
    config.data.ct.test_fraction = 0.25
    config.data.ct.cache_dir = "~/.cache/jaxfl/ct"
    config.data.ct.pad_multiple = 16
    config.partition.heldout_fraction = 0.25
    config.num_clients = 5
    config.model = ml_collections.ConfigDict(dict(name="unet", base_features=16, depth=4, groups=8))
    config.algorithm.name = "perfedavg_fo"
    config.algorithm.alpha = 1e-2
    config.algorithm.beta = 1e-2
    config.local.optimizer = "adam"
    config.local.learning_rate = 1e-3
    config.local.batch_size = 8
    config.local.epochs = 1
    config.rounds = 30
    config.eval_every = 1
    config.eval_batch_size = 32
    config.personalization.enabled = True
    config.personalization.adapt_steps = 5
    config.personalization.adapt_lr = 1e-2
    return config
