"""Privacy audit on CT: iDLG against every protection on AdrenalMNIST3D volumes (28^3 CT crops).

The BreastMNIST audit (configs/attack_idlg.py) with 3D inputs: each of 8 sites holds one CT
volume for the inversion, and the figure shows the middle slice of each reconstruction (SSIM
is the mean over slices). Needs adrenalmnist3d.npz in $JAXFL_DATA_DIR.
  python -m experiments.attack --config=configs/attack_idlg_ct3d.py --workdir=runs/attack_ct
"""

import ml_collections

from configs import attack_idlg


def get_config() -> ml_collections.ConfigDict:
    config = attack_idlg.get_config()
    config.data.name = "adrenalmnist3d"
    config.model.hidden = (64,)
    config.attack.audit_trials = 1000
    config.attack.mia_rounds = 10
    return config
