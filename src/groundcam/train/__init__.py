"""Training: the AMC loss on maps and box masks, the shared Accelerate loop, and groundcam's
trainers (`albef_shapes`, `trocr_glyphs`, `amc`)."""

from groundcam.train.amc_loss import AMCLoss, AMCTerms, MaskReport, box_mask, box_masks
from groundcam.train.loop import LoopConfig, fit, lr_at, main_process, param_groups, shard

__all__ = [
    "AMCLoss",
    "AMCTerms",
    "LoopConfig",
    "MaskReport",
    "box_mask",
    "box_masks",
    "fit",
    "lr_at",
    "main_process",
    "param_groups",
    "shard",
]
