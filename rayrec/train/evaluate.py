"""Full-ranking evaluation: every user's targets ranked against the whole catalogue.

Protocol (anchors.md, "full ranking"): for each evaluated user the model scores every item;
column 0 (padding) and every item the user has already interacted with (`data.history`)
are masked to -inf; the top max(ks) items are compared with the user's targets. All
targets of a user are relevant (one for leave-one-out, many for ratio/graph splits).

Work is batched over users and vectorised inside a batch; scores stay on the model's
device and are synchronised with the host once, at the end.

A rating model (task 'rating') is evaluated instead on its predicted ratings of the held-out
(user, item) pairs: RMSE and MAE over every held-out rating (`rate_users`), with the same
history (train for validation, train + validation for test) as its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from rayrec.data.types import CSR, SplitData
from rayrec.train import metrics as M

_INT64_MIN = torch.iinfo(torch.int64).min


@dataclass
class Ranking:
    """One evaluation: the metrics averaged over users and, when asked for, per user.

    per_user columns: 'user' (the split's user index), 'n_targets', 'rank' (1-based
    full-ranking rank of the user's best-ranked target, ties counted against it) and every
    per-user metric ('ndcg@10', ..., 'sampled_*' when sampled metrics are on), in the
    order the users were evaluated. The mean of a metric's column is the aggregate.
    """

    metrics: dict[str, float]
    per_user: dict[str, np.ndarray] | None = None


def padded_rows(csr: CSR, users: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """The rows of `users`, right-padded with 0: int64 [len(users), max(1, longest row)]; with
    `values` (aligned with csr.items, e.g. csr.ratings), those values instead, in their dtype."""
    users = np.asarray(users, dtype=np.int64)
    starts = csr.indptr[users]
    lengths = csr.indptr[users + 1] - starts
    width = max(1, int(lengths.max())) if len(users) else 1
    source = csr.items if values is None else values
    out = np.zeros((len(users), width), dtype=source.dtype)
    col = np.arange(width)[None, :]
    inside = col < lengths[:, None]
    out[inside] = source[(starts[:, None] + col)[inside]]
    return out


def history_mask_indices(history: CSR, users: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Item ids to mask for each user: LongTensor [B, Lmax], padded with 0.

    Scattering -inf with it also hits column 0, which the evaluator masks anyway (every
    row, padded or not).
    """
    return torch.from_numpy(padded_rows(history, users)).to(device)


def batch_to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """numpy arrays and tensors to `device`; integer ones become int64 (ids), others keep their dtype."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            value = torch.as_tensor(value)
        if isinstance(value, torch.Tensor):
            integer = not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
            value = value.to(device, dtype=torch.long if integer else value.dtype, non_blocking=True)
        out[key] = value
    return out


def evaluate(
    model,
    data: SplitData,
    split: Literal["valid", "test"],
    ks: list[int],
    device: torch.device | str,
    batch_size: int = 512,
    sampled_negatives: int = 0,
    seed: int = 0,
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """Full-ranking metrics of `model` on `split`, averaged over users.

    users: whom to evaluate (default: `data.eval_users(split)`); users without targets in
    `split` are skipped. Returns {'hr@K', 'recall@K', 'precision@K', 'ndcg@K', 'mrr@K',
    'coverage@K' for each K, 'avg_rank', 'n_users'} and, when sampled_negatives > 0,
    'sampled_hr@K', 'sampled_ndcg@K', 'sampled_mrr@K' (see `rank_users`). With no user
    to evaluate every metric is NaN and n_users is 0.
    """
    return evaluation(model, data, split, ks, device, batch_size, sampled_negatives, seed, users).metrics


def evaluation(
    model,
    data: SplitData,
    split: Literal["valid", "test"],
    ks: list[int],
    device: torch.device | str,
    batch_size: int = 512,
    sampled_negatives: int = 0,
    seed: int = 0,
    users: np.ndarray | None = None,
    per_user: bool = False,
) -> Ranking:
    """`evaluate` as a Ranking: with per_user, one row per evaluated user as well."""
    if users is None:
        users = data.eval_users(split)
    if model.task == "rating":
        return rate_users(model, data.history(split), data.targets(split), users, device, batch_size, per_user)
    return rank_users(
        model,
        data.history(split),
        data.targets(split),
        data.n_items,
        users,
        ks,
        device,
        batch_size=batch_size,
        sampled_negatives=sampled_negatives,
        seed=seed,
        per_user=per_user,
    )


def evaluate_on_train(
    model,
    data: SplitData,
    users: np.ndarray,
    ks: list[int],
    device: torch.device | str,
    batch_size: int = 512,
) -> dict[str, float]:
    """Training-set fit, for the train/validation gap: rank each user's LAST training item.

    History = the user's training row minus its last item; target = that last item; users
    with fewer than two training items are skipped. The model's weights have seen the
    target during training, which is the point: a large gap between this and the
    validation figures means over-fitting. Keys are as in `evaluate` (no sampled metrics);
    the caller adds a prefix such as 'train_'.
    """
    history, targets = split_last_item(data.train)
    users = np.asarray(users, dtype=np.int64)
    users = users[data.train.lengths()[users] >= 2]
    return rank_users(model, history, targets, data.n_items, users, ks, device, batch_size=batch_size).metrics


def split_last_item(rows: CSR) -> tuple[CSR, CSR]:
    """(every row minus its last item, the last item of every non-empty row) as two CSRs."""
    lengths = rows.lengths()
    last = rows.indptr[1:][lengths > 0] - 1  # position of each non-empty row's last item
    keep = np.ones(rows.nnz, dtype=bool)
    keep[last] = False
    head_indptr = np.zeros_like(rows.indptr)
    np.cumsum(np.maximum(lengths - 1, 0), out=head_indptr[1:])
    tail_indptr = np.zeros_like(rows.indptr)
    np.cumsum(lengths > 0, out=tail_indptr[1:])
    return CSR(head_indptr, rows.items[keep]), CSR(tail_indptr, rows.items[last])


# Long: the evaluation loop in one piece, so each batch's scores are masked, ranked and
# consumed in place (no copy of a [B, n_items] matrix leaves the loop).
def rank_users(
    model,
    history: CSR,
    targets: CSR,
    n_items: int,
    users: np.ndarray,
    ks: list[int],
    device: torch.device | str,
    batch_size: int = 512,
    sampled_negatives: int = 0,
    seed: int = 0,
    per_user: bool = False,
) -> Ranking:
    """The evaluation loop shared by `evaluate` and `evaluate_on_train`.

    Sampled metrics: each user's first target is ranked among `sampled_negatives` distinct
    items drawn uniformly from those not in the user's history or targets. The draw is a
    hash of (seed, user, item), so the same seed gives the same negatives on any device and
    for any batch size.
    """
    device = torch.device(device)
    ks = sorted(set(int(k) for k in ks))
    users = np.asarray(users, dtype=np.int64)
    users = users[targets.lengths()[users] > 0]
    # Users of similar history length share a batch, so sequence models compute little
    # padding; every metric is a per-user sum, so the order changes nothing else.
    users = users[np.argsort(history.lengths()[users], kind="stable")]
    n_cols = n_items + 1
    kmax = min(max(ks), n_cols)
    n_sampled = min(int(sampled_negatives), n_items)

    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {}  # per-user values by batch, when per_user
    seen = {k: torch.zeros(n_cols, dtype=torch.bool, device=device) for k in ks}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(users), batch_size):
                batch_users = users[start : start + batch_size]
                inputs = batch_to_device(model.eval_inputs(history, batch_users), device)
                scores = _writable(model.score(inputs).float(), model)  # [B, n_cols]
                hist_idx = history_mask_indices(history, batch_users, device)  # [B, Lmax]
                scores.scatter_(1, hist_idx, float("-inf"))
                scores[:, 0] = float("-inf")  # padding
                top_scores, top_ids = scores.topk(kmax, dim=1)  # [B, kmax]
                if top_scores.isnan().any():
                    # A diverged model: topk ranks NaN first, so any unmasked NaN shows up here.
                    # Rank it last instead, as -inf; only such batches pay for the extra pass.
                    scores.masked_fill_(scores.isnan(), float("-inf"))
                    top_scores, top_ids = scores.topk(kmax, dim=1)
                # A user with fewer than kmax unmasked items gets masked picks: make them misses.
                top_ids = top_ids.masked_fill(top_scores == float("-inf"), 0)
                tgt_idx = torch.from_numpy(padded_rows(targets, batch_users)).to(device)  # [B, T]
                batch_metrics = M.full_ranking_metrics(top_ids, tgt_idx, ks)
                for k in ks:
                    M.mark_recommended(seen[k], top_ids[:, :k])
                if n_sampled > 0:
                    batch_metrics.update(_sampled(scores, hist_idx, tgt_idx, batch_users, n_sampled, ks, seed))
                batch_metrics["avg_rank"] = M.first_target_rank_(scores, tgt_idx)  # the last use: consumes scores
                for key, value in batch_metrics.items():
                    total = value.double().sum()
                    sums[key] = sums[key] + total if key in sums else total
                    if per_user:
                        rows.setdefault(key, []).append(value.float())
    finally:
        model.train(was_training)

    n_users = len(users)
    result: dict[str, float] = {}
    for k in ks:
        for name in M.FULL_RANKING:
            result[f"{name}@{k}"] = float(sums[f"{name}@{k}"]) / n_users if n_users else float("nan")
        result[f"coverage@{k}"] = M.catalogue_coverage(seen[k]) if n_users else float("nan")
    result["avg_rank"] = float(sums["avg_rank"]) / n_users if n_users else float("nan")
    if n_sampled > 0:
        for k in ks:
            for name in M.SAMPLED:
                key = f"sampled_{name}@{k}"
                result[key] = float(sums[key]) / n_users if n_users else float("nan")
    result["n_users"] = n_users
    if not per_user:
        return Ranking(result)
    table = {"user": users, "n_targets": targets.lengths()[users].astype(np.int64)}
    for key, parts in rows.items():
        # One host copy per column, at the end (the loop itself never synchronises).
        table["rank" if key == "avg_rank" else key] = torch.cat(parts).cpu().numpy()
    if not n_users:
        table.update({key: np.zeros(0, dtype=np.float32) for key in _per_user_keys(ks, n_sampled)})
    return Ranking(result, table)


def rate_users(
    model,
    history: CSR,
    targets: CSR,
    users: np.ndarray,
    device: torch.device | str,
    batch_size: int = 512,
    per_user: bool = False,
) -> Ranking:
    """RMSE and MAE of a rating model's predictions of the users' held-out ratings (`targets`
    with ratings), given `history`. Returns {'rmse', 'mae', 'n_ratings', 'n_users'}; NaN
    errors when nobody is evaluated. per_user columns: 'user', 'n_targets', and the user's
    summed squared 'se' and absolute 'ae' errors, so sum(se) / sum(n_targets) = rmse^2.
    """
    device = torch.device(device)
    users = np.asarray(users, dtype=np.int64)
    users = users[targets.lengths()[users] > 0]
    sums = {key: torch.zeros((), dtype=torch.float64, device=device) for key in ("se", "ae", "n")}
    rows: dict[str, list[torch.Tensor]] = {"se": [], "ae": []}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(users), batch_size):
                batch_users = users[start : start + batch_size]
                inputs = batch_to_device(model.eval_inputs(history, batch_users), device)
                predicted = model.score(inputs).float()  # [B, n_cols]: every item's predicted rating
                items = torch.from_numpy(padded_rows(targets, batch_users)).to(device)  # [B, T], 0 = padding
                truth = torch.from_numpy(padded_rows(targets, batch_users, targets.ratings)).to(device)  # [B, T]
                errors = M.rating_errors(predicted.gather(1, items), truth, items != 0)
                for key in sums:
                    sums[key] += errors[key].sum()
                if per_user:
                    for key in rows:
                        rows[key].append(errors[key])
    finally:
        model.train(was_training)
    n = float(sums["n"])
    result = {
        "rmse": float(torch.sqrt(sums["se"] / n)) if n else float("nan"),
        "mae": float(sums["ae"] / n) if n else float("nan"),
        "n_ratings": int(n),
        "n_users": len(users),
    }
    if not per_user:
        return Ranking(result)
    table = {"user": users, "n_targets": targets.lengths()[users].astype(np.int64)}
    for key, parts in rows.items():
        table[key] = torch.cat(parts).cpu().numpy() if parts else np.zeros(0, dtype=np.float64)
    return Ranking(result, table)


def _per_user_keys(ks: list[int], n_sampled: int) -> list[str]:
    names = [f"{name}@{k}" for k in ks for name in M.FULL_RANKING] + ["rank"]
    if n_sampled > 0:
        names += [f"sampled_{name}@{k}" for k in ks for name in M.SAMPLED]
    return names


def _writable(scores: torch.Tensor, model) -> torch.Tensor:
    """`scores`, or a copy where it may be the model's own memory (a view, a buffer).

    The evaluator masks scores in place; a fresh product (the usual case) is used as it is,
    which saves a full [B, n_cols] copy per batch.
    """
    if scores._base is None:
        ptr = scores.untyped_storage().data_ptr()
        tensors = list(model.parameters()) + list(model.buffers())
        if all(t.untyped_storage().data_ptr() != ptr for t in tensors):
            return scores
    return scores.clone()


def _sampled(
    scores: torch.Tensor,
    hist_idx: torch.Tensor,
    tgt_idx: torch.Tensor,
    batch_users: np.ndarray,
    n: int,
    ks: list[int],
    seed: int,
) -> dict[str, torch.Tensor]:
    """Sampled metrics for one batch: the first target against n unseen, non-target items.

    tgt_idx: int64 [B, T] padded targets; column 0 holds each user's first target.
    """
    users_t = torch.from_numpy(batch_users).to(scores.device)
    # Random keys per (user, item); excluded items get the lowest key, so the top-n keys are
    # a uniform sample without replacement of the allowed items. Padding (0) in either index
    # hits column 0, which is excluded anyway.
    keys = item_hash(seed, users_t, scores.shape[1])  # int64 [B, n_cols]
    keys.scatter_(1, hist_idx, _INT64_MIN)
    keys.scatter_(1, tgt_idx, _INT64_MIN)
    keys[:, 0] = _INT64_MIN  # padding
    picked_keys, negatives = keys.topk(n, dim=1)  # [B, n]
    valid = picked_keys != _INT64_MIN
    target_scores = scores.gather(1, tgt_idx[:, :1]).squeeze(1)
    return M.sampled_metrics(target_scores, scores.gather(1, negatives), ks, valid)


def _signed(x: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def item_hash(seed: int, users: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Pseudo-random int64 key for every (seed, user, item id < n_cols): [B, n_cols].

    SplitMix64's finaliser over a mix of the three; int64 arithmetic wraps, as the
    unsigned algorithm needs. Depends on nothing but its arguments.
    """
    items = torch.arange(n_cols, device=users.device, dtype=torch.int64)
    x = (
        users.long()[:, None] * _signed(0x9E3779B97F4A7C15)
        + items[None, :] * _signed(0xC2B2AE3D27D4EB4F)
        + _signed((int(seed) + 1) * 0x165667B19E3779F9)
    )
    x = x ^ _shr(x, 30)
    x = x * _signed(0xBF58476D1CE4E5B9)
    x = x ^ _shr(x, 27)
    x = x * _signed(0x94D049BB133111EB)
    return x ^ _shr(x, 31)
