"""Personalized segmentation under scanner shift: FedAvg vs Per-FedAvg vs local-only on phantoms.

``configs/seg_debug.py`` (five hospitals, each its own simulated scanner; hospital 4's thick
slices smear lesions into neighbouring slices) with adapt-then-test evaluation for every
algorithm: 5 SGD steps (lr 0.01) on the hospital's own training slices, then its held-out
patients, logged as ``personalized_dice`` per hospital. The README's table:

  python -m experiments.sweep --config=configs/seg_personalization.py --workdir=runs/segpers \\
      --sweep='algorithm=fedavg,perfedavg_fo,local' --sweep='seed=0,1,2'

Per-FedAvg's outer step is plain SGD; beta = 0.1 trains the U-Net about as fast as FedAvg's
Adam (3e-3) in 20 rounds.
"""

import ml_collections

from configs import seg_debug


def get_config() -> ml_collections.ConfigDict:
    config = seg_debug.get_config()
    config.algorithm.name = "perfedavg_fo"
    config.algorithm.alpha = 1e-2
    config.algorithm.beta = 0.1
    config.personalization.enabled = True
    config.personalization.adapt_steps = 5
    config.personalization.adapt_lr = 1e-2
    config.rounds = 20
    config.eval_every = 2
    return config
