"""Training: the AMC loss on maps and box masks, and groundcam's trainers."""

from groundcam.train.amc_loss import AMCLoss, AMCTerms, MaskReport, box_mask, box_masks

__all__ = ["AMCLoss", "AMCTerms", "MaskReport", "box_mask", "box_masks"]
