"""Next-item losses shared by the sequential models (field-lessons §7: loss and negatives
are hyper-parameters, so every sequential model offers the same set)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from rayrec.models.ops import softmax_cross_entropy

LOSSES = ("ce", "bce", "bpr", "sampled_softmax")


def item_loss(
    hidden: torch.Tensor, targets: torch.Tensor, item_weight: torch.Tensor, kind: str, negatives: int
) -> torch.Tensor:
    """Loss of predicting `targets` from `hidden` with output item embeddings `item_weight`.

    hidden: (P, C) states at the P supervised positions; targets: (P,) item ids >= 1;
    item_weight: (N + 1, C), row 0 = padding.
    ce: full softmax over all N items (the strongest choice, SASRec+), in chunks (ops.py).
    bce: one positive vs `negatives` uniform negatives, binary cross-entropy (vanilla SASRec).
    bpr: pairwise -log sigmoid(pos - neg), averaged over `negatives` negatives (GRU4Rec-style).
    sampled_softmax: softmax over the positive and `negatives` uniform negatives.
    Negatives come from torch's generator on the device, so seeding torch fixes them.
    """
    if kind == "ce":
        return softmax_cross_entropy(hidden, item_weight, targets)
    n_items = item_weight.shape[0] - 1
    neg = torch.randint(1, n_items + 1, (targets.shape[0], negatives), device=targets.device)  # (P, k)
    pos_logit = (hidden * item_weight[targets]).sum(-1)  # (P,)
    neg_logit = torch.einsum("pc,pkc->pk", hidden, item_weight[neg])  # (P, k)
    if kind == "bce":
        pos_loss = F.binary_cross_entropy_with_logits(pos_logit.float(), torch.ones_like(pos_logit, dtype=torch.float))
        neg_loss = F.binary_cross_entropy_with_logits(neg_logit.float(), torch.zeros_like(neg_logit, dtype=torch.float))
        return pos_loss + neg_loss
    if kind == "bpr":
        return -F.logsigmoid((pos_logit[:, None] - neg_logit).float()).mean()
    if kind == "sampled_softmax":
        logits = torch.cat([pos_logit[:, None], neg_logit], dim=1).float()
        # A sampled negative equal to the positive would be a false negative; mask it out.
        logits[:, 1:] = logits[:, 1:].masked_fill(neg == targets[:, None], float("-inf"))
        return F.cross_entropy(logits, torch.zeros_like(targets))
    raise ValueError(f"unknown loss {kind!r}; valid: {', '.join(LOSSES)}")
