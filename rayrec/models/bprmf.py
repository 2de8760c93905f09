"""BPR-MF (Rendle et al., 2009): one embedding per user and per item, score = dot product,
trained with the pairwise BPR loss on (user, positive, sampled negative) triples.

It is also the base of LightGCN, which only changes how the final embeddings are computed
(`final_embeddings`): the loss, the L2 term, the batches and the scoring are shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rayrec.data.batches import pair_batches
from rayrec.errors import UserError
from rayrec.models.base import ModelSpec, RecModel


@dataclass
class BPRMFConfig:
    hidden: int = 64  # embedding size
    reg: float = 1e-4  # L2 on the batch's ego embeddings, LightGCN-scaled: reg * 0.5 * ||.||^2 / batch
    negatives: int = 1  # uniform negatives per positive (anchors.md: the LightGCN protocol uses 1)
    init_std: float = 0.1  # normal init of the embeddings (field-lessons §5: ~0.1, not 0.01)
    # Training pairs: "edges" = every interaction once per epoch; "users" = the LightGCN
    # reference's sampler (a uniform user, then one of its items); see pair_batches.
    sampling: str = "edges"

    def validate(self) -> None:
        check_graph_config(self)


def check_graph_config(cfg) -> None:
    """Checks the fields the pair-trained graph models share (init_std where the model has it)."""
    if cfg.hidden < 1:
        raise UserError(f"model.hidden must be >= 1, got {cfg.hidden}")
    if cfg.reg < 0:
        raise UserError(f"model.reg must be >= 0, got {cfg.reg}")
    if cfg.negatives < 1:
        raise UserError(f"model.negatives must be >= 1, got {cfg.negatives}")
    if hasattr(cfg, "init_std") and not cfg.init_std > 0:
        raise UserError(f"model.init_std must be > 0, got {cfg.init_std}")
    if cfg.sampling not in ("edges", "users"):
        raise UserError(f"model.sampling must be 'edges' or 'users', got {cfg.sampling!r}")


class BPRMF(RecModel):
    kind = "graph"

    def __init__(self, cfg: BPRMFConfig, data):
        super().__init__(cfg, data)
        # Ego embeddings; item id i (1..n_items) is row i - 1, so no row is wasted on padding.
        self.user_emb = nn.Embedding(data.n_users, cfg.hidden)
        self.item_emb = nn.Embedding(data.n_items, cfg.hidden)
        nn.init.normal_(self.user_emb.weight, std=cfg.init_std)
        nn.init.normal_(self.item_emb.weight, std=cfg.init_std)
        self._eval_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def ego_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned (ego) embeddings in id order: (users (U, C), items (N, C))."""
        return self.user_emb.weight, self.item_emb.weight

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users (U, C), items (N, C)) that scores are dot products of; MF uses the ego embeddings."""
        return self.user_emb.weight, self.item_emb.weight

    def train_batches(self, data, batch_size: int, rng: np.random.Generator, bucket_batches: int = 1):
        return pair_batches(data.train, self.n_items, batch_size, rng, self.cfg.negatives, sampling=self.cfg.sampling)

    def batch_embeddings(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Final and ego embeddings of a batch's rows: (final users (B, C), final items (M, C),
        ego users (B, C), ego items (M, C)); users (B,) and items (M,) are table rows.

        MF's final embeddings are its ego embeddings: one gather per table serves both, so the
        backward writes each table's gradient once instead of once per use.
        """
        u = F.embedding(users, self.user_emb.weight)  # (B, C)
        i = F.embedding(items, self.item_emb.weight)  # (M, C)
        return u, i, u, i

    def loss(self, batch):
        users, pos, neg = batch["users"], batch["pos"] - 1, batch["neg"] - 1  # (B,), (B,), (B, k); item rows
        b, k = neg.shape
        # Recomputed on every call, i.e. after every optimiser step: reusing embeddings
        # computed before a step trains on stale values (field-lessons §4).
        u, items, ego_u, ego_items = self.batch_embeddings(users, torch.cat([pos, neg.reshape(-1)]))
        p, n = items[:b], items[b:].view(b, k, -1)  # (B, C), (B, k, C)
        pos_score = (u * p).sum(-1)  # (B,)
        neg_score = torch.einsum("bc,bkc->bk", u, n)  # (B, k)
        pairwise = F.softplus(neg_score.float() - pos_score.float()[:, None])  # = -log sigmoid(pos - neg)
        weight = self.positive_weights(batch)
        bpr = (pairwise if weight is None else weight[:, None] * pairwise).mean()
        # L2 on the EGO embeddings of the batch, as LightGCN does: 0.5 * ||.||^2 / batch size,
        # the negatives' term averaged over the k negatives so that reg means the same for any k.
        ego_p, ego_n = ego_items[:b], ego_items[b:]
        l2 = 0.5 * (ego_u.pow(2).sum() + ego_p.pow(2).sum() + ego_n.pow(2).sum() / k) / b
        return bpr + self.cfg.reg * l2.float()

    def positive_weights(self, batch) -> torch.Tensor | None:
        """(B,) weights of each positive's BPR terms, or None for equal weights (DGRec reweights)."""
        return None

    def score(self, batch):
        tables = self._eval_cache
        if tables is None:
            user_final, item_final = self.final_embeddings()
            padding = item_final.new_zeros(1, item_final.shape[1])  # column 0 (padding) is a dummy
            tables = (user_final, torch.cat([padding, item_final]))
            if not self.training:
                # One propagation per evaluation phase: the weights do not change in eval
                # mode, and `train(mode)` drops the cache when the phase ends.
                tables = (tables[0].detach(), tables[1].detach())
                self._eval_cache = tables
        user_final, item_table = tables
        return user_final[batch["users"]] @ item_table.T  # (B, N + 1)

    def train(self, mode: bool = True):
        self._eval_cache = None
        return super().train(mode)

    def _apply(self, *args, **kwargs):
        # .to(device) / .float() replace the tensors: a cached table would be on the old device or dtype.
        self._eval_cache = None
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._eval_cache = None  # new weights (a restore, a PBT exploit) while in eval mode
        return super()._load_from_state_dict(*args, **kwargs)


# AdamW weight decay is 0 because the L2 term lives in the loss and touches only the
# batch's embeddings, as in LightGCN's protocol (anchors.md: L2 1e-4 on the ego embeddings);
# decoupled decay on top would shrink every embedding at every step, sampled or not.
# Graph models split each user's interactions at random (the LightGCN protocol) unless told otherwise.
# The recipe: the LightGCN reference trains up to 1,000 epochs at a constant lr; BPR starts
# slowly (field-lessons §5), so patience is long.
GRAPH_TRAIN_DEFAULTS = {
    "lr": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0, "batch_size": 2048, "epochs": 1000,
    "patience": 50, "warmup_epochs": 0.0, "metric": "recall@20",
}

SPEC = ModelSpec(
    name="bprmf", kind="graph", config_cls=BPRMFConfig, model_cls=BPRMF,
    train_defaults=dict(GRAPH_TRAIN_DEFAULTS), data_defaults={"split": "ratio"},
)
