"""Privacy audit on CT slices, PPPML-HMI's gradient-leakage demonstration for segmentation.

8 hospitals, each a simulated CT scanner (``jaxfl/data/phantoms.py``: HU offset, noise, blur,
resolution), each holding one lung slice with its infection mask for the inversion. The model
is a sigmoid MLP with per-pixel logits (``model.per_pixel``), trained with one plain SGD step
per slice. A mask has one label per pixel, so iDLG's label rule does not apply: DLG (Adam lr
0.1, squared-L2 gradient matching) reconstructs the slice and its mask together. Per
protection: PSNR/SSIM of the slice, pixel accuracy and Dice of the mask, membership inference
and, for DP, the accountant's epsilon next to the audited bound.
  python -m experiments.attack --config=configs/attack_dlg_ct.py --workdir=runs/attack_ct
On a real CT instead of the phantoms (one patient, so one client; the attacks on one client's
update): --config.data.source=totalseg_example --config.data.data_dir=../shared/data ...
(README, "How private is it?").
"""

import ml_collections

from configs import attack_idlg, seg_debug


def get_config() -> ml_collections.ConfigDict:
    config = seg_debug.get_config()
    config.task.loss = "ce"
    config.num_clients = 8
    config.data.ct.patients_per_site = 4
    config.data.ct.num_slices = 4
    config.data.ct.phantom_size = (32, 32)
    config.data.ct.pad_multiple = 1
    config.data.ct.test_fraction = 0.25
    # Each site keeps one held-out patient: the personalized models' non-members.
    config.partition.heldout_fraction = 0.25
    config.model = ml_collections.ConfigDict(
        dict(name="mlp", hidden=(256,), activation="sigmoid", per_pixel=True)
    )
    config.attack.method = "dlg"
    return attack_idlg.attacked_training(config)
