"""The token loss every pretraining layout computes (lmfleet.train.loop)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmfleet.train.objectives import IGNORE


def per_sample_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each sample's summed token cross-entropy (fp32), IGNORE targets skipped."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return ce.view(targets.shape).sum(dim=1)
