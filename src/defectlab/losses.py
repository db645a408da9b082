"""Losses shared by the trained methods.

``focal_loss`` is the focal loss of Lin et al. ("Focal Loss for Dense Object Detection",
ICCV 2017), FL(p_t) = -α_t (1 - p_t)^γ log(p_t), used for anomaly segmentation by DRAEM, DSR
(Eq. 3) and SLSG: it down-weights the many easy (mostly normal) pixels so the few anomalous
ones dominate the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0, alpha: float | None = None,
               reduction: str = "mean") -> torch.Tensor:
    """Focal loss on raw network outputs.

    Two layouts:

    * ``logits`` (B, C, ...) with C ≥ 2: softmax over C classes; ``target`` (B, ...) holds
      integer class indices (for a binary anomaly mask: 0 normal, 1 anomalous).
    * ``logits`` (B, 1, ...): one sigmoid output; ``target`` (B, 1, ...) or (B, ...) holds
      values in [0, 1].

    ``alpha`` (binary cases only) weighs class 1 by α and class 0 by 1 - α; ``None`` weighs both
    by 1. ``gamma = 0`` and ``alpha = None`` reduce to cross-entropy. ``reduction`` is
    ``mean``, ``sum`` or ``none`` (per-element losses, shaped like ``target``).
    """
    if logits.shape[1] == 1:
        target = target.reshape(logits.shape).to(logits.dtype)
        log_p1 = F.logsigmoid(logits)
        log_p0 = F.logsigmoid(-logits)
        log_pt = target * log_p1 + (1 - target) * log_p0
        weight_1 = 1.0 if alpha is None else alpha
        weight_0 = 1.0 if alpha is None else 1.0 - alpha
        alpha_t = target * weight_1 + (1 - target) * weight_0
    else:
        target = target.long()
        log_pt = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        if alpha is None:
            alpha_t = torch.ones_like(log_pt)
        else:
            if logits.shape[1] != 2:
                raise ValueError("alpha weighting is defined for binary targets only")
            alpha_t = torch.where(target == 1, alpha, 1.0 - alpha).to(log_pt.dtype)
    loss = -alpha_t * (1 - log_pt.exp()).pow(gamma) * log_pt
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r} (mean, sum or none)")
