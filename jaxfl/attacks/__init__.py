"""Privacy attacks against what jaxfl's clients send: gradient inversion (DLG, iDLG, inverting
gradients), membership inference (loss threshold, shadow-free likelihood ratio) and the
empirical epsilon audit of every DP mode."""

from jaxfl.attacks.inversion import (
    ATTACKS,
    PPPML_IDLG,
    AttackConfig,
    gradient_distance,
    invert,
    invert_many,
    local_update_fn,
    match_reconstructions,
    psnr,
    recover_labels,
    ssim,
    total_variation,
)

__all__ = [
    "ATTACKS",
    "PPPML_IDLG",
    "AttackConfig",
    "gradient_distance",
    "invert",
    "invert_many",
    "local_update_fn",
    "match_reconstructions",
    "psnr",
    "recover_labels",
    "ssim",
    "total_variation",
]
