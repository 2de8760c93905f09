"""ALS for implicit feedback (Hu, Koren & Volinsky, "Collaborative Filtering for Implicit
Feedback Datasets", ICDM 2008), in PyTorch so it runs on the trial's device.

    minimise  sum_{u,i} c_ui (p_ui - x_u . y_i)^2 + reg (sum_u ||x_u||^2 + sum_i ||y_i||^2)
    p_ui = 1 if user u has item i in training, else 0;  c_ui = 1 + alpha p_ui

An epoch is one alternating sweep: every user's factors solved exactly given the items',
then every item's given the users'. Each solve uses the paper's trick: with Y the other
side's factors (M, f) and I_u the rows user u touched,

    (Y^T Y + alpha Y_Iu^T Y_Iu + reg I) x_u = (1 + alpha) Y_Iu^T 1

so Y^T Y is computed once per half-sweep and each user adds only its own rows. By default
(`cg_steps=0`) every system is solved exactly (torch.linalg.solve on (B, f, f)); with
`cg_steps` > 0 each gets that many conjugate-gradient steps warm-started from the factors so
far (Takacs, Pilaszy & Tikk, RecSys 2011; implicit's default, 3): a step costs O(|I_u| f)
instead of the O(|I_u| f^2) of forming the matrix, but in PyTorch on a CPU its batched
matrix-vector products are memory-bound, and at 64 factors on ML-1M an exact sweep took
3.0-3.4 s of CPU against 4.3-4.5 s for 3 CG steps (docs/benchmarks.md). The factors live in
the model's state either way, so a checkpoint resumes exactly. Rows are batched in chunks
whose gathered factors stay under a fixed budget.
Each sweep decreases the objective (CG never increases a quadratic it minimises; reported
as the epoch's loss, per training interaction), and every sweep is one report, so ASHA can
prune and early stopping can end the run.

Scoring folds the user in from the history it is given (one exact user solve against the
item factors, as `implicit`'s recalculate_user does), so a test user's validation item
counts, as it does for EASE and SLIM, and any user with a history can be scored.

Checked against benfred/implicit (implicit/cpu/als.py): user then item solve per iteration,
3 CG steps by default, confidence stored as alpha * r there, so implicit's alpha equals
1 + alpha here on binary data (bench/als_implicit.py compares the two).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rayrec.data.batches import interaction_matrix, item_sets
from rayrec.data.types import CSR, SplitData
from rayrec.errors import UserError
from rayrec.models.base import ModelSpec, RecModel

# Gathered factor entries (rows x width x factors) one batched solve may hold: 2^24 floats = 64 MB.
GATHER_BUDGET = 1 << 24


@dataclass
class ALSConfig:
    factors: int = 64  # latent dimension f
    reg: float = 0.01  # L2 on every user and item factor (the paper's lambda)
    alpha: float = 10.0  # confidence of an observed interaction: c = 1 + alpha (the paper used 40)
    init_std: float = 0.01  # normal init of the item factors (the first half-sweep solves the users')
    cg_steps: int = 0  # 0 = exact solves; > 0: that many warm-started conjugate-gradient steps per solve

    def validate(self) -> None:
        if self.factors < 1:
            raise UserError(f"model.factors must be >= 1, got {self.factors}")
        if not self.reg > 0:
            raise UserError(f"model.reg must be > 0 (it keeps each solve well posed), got {self.reg}")
        if self.alpha < 0:
            raise UserError(f"model.alpha must be >= 0, got {self.alpha}")
        if not self.init_std > 0:
            raise UserError(f"model.init_std must be > 0, got {self.init_std}")
        if self.cg_steps < 0:
            raise UserError(f"model.cg_steps must be >= 0 (0 = exact solves), got {self.cg_steps}")


class ALS(RecModel):
    kind = "matrix"
    fits_itself = True

    def __init__(self, cfg: ALSConfig, data: SplitData):
        super().__init__(cfg, data)
        f = cfg.factors
        # Row 0 of each table is a zero row that padded id lists gather: users are rows
        # 1..U (user u at u + 1), items rows 1..N (item i at i).
        users = torch.zeros(data.n_users + 1, f)  # (U + 1, f)
        items = torch.zeros(data.n_items + 1, f)  # (N + 1, f)
        items[1:].normal_(0.0, cfg.init_std)
        self.register_buffer("user_factors", users)
        self.register_buffer("item_factors", items)

    def fit_epoch(self, data: SplitData, epoch: int, rng: np.random.Generator) -> float:
        by_user, by_item = training_rows(data)
        cfg = self.cfg
        self.user_factors[1:] = solve_all(self.item_factors, by_user, cfg.reg, cfg.alpha, self.user_factors[1:], cfg.cg_steps)
        self.item_factors[1:] = solve_all(self.user_factors, by_item, cfg.reg, cfg.alpha, self.item_factors[1:], cfg.cg_steps)
        return self.objective(by_user) / max(by_user.nnz, 1)

    def objective(self, by_user: CSR) -> float:
        """The training objective: sum over every (u, i) of c_ui (p_ui - s_ui)^2 plus the L2 terms.

        Over all pairs sum s^2 = <X^T X, Y^T Y>; the observed pairs then add
        (1 + alpha)(1 - s)^2 - s^2 each, so nothing U x N is ever formed.
        """
        x, y = self.user_factors, self.item_factors
        total = float((x.T @ x * (y.T @ y)).sum())
        users, items = by_user.rows(), by_user.items
        step = max(1, GATHER_BUDGET // self.cfg.factors)
        for s in range(0, len(items), step):
            u = torch.from_numpy(users[s : s + step] + 1).to(x.device)
            i = torch.from_numpy(items[s : s + step]).to(x.device)
            score = (x[u] * y[i]).sum(1).double()
            total += float(((1.0 + self.cfg.alpha) * (1.0 - score) ** 2 - score**2).sum())
        return total + self.cfg.reg * float(x.pow(2).sum() + y.pow(2).sum())

    def eval_inputs(self, history, users):
        return {"items": item_sets(history, users)}

    def score(self, batch):
        items = batch["items"]  # (B, L) item ids, 0 = padding
        users = torch.cat([solve_rows(self.item_factors, self.item_factors.T @ self.item_factors, rows,
                                      self.cfg.reg, self.cfg.alpha)
                           for rows in split_rows(items, self.cfg.factors)])
        return users @ self.item_factors.T  # (B, N + 1)


def training_rows(data: SplitData) -> tuple[CSR, CSR]:
    """The distinct training interactions as (items per user, users + 1 per item) CSRs, so both
    half-sweeps gather from tables whose row 0 is the zero padding row."""
    matrix = interaction_matrix(data.train, data.n_items)  # binary, sorted, duplicates merged
    by_user = CSR(matrix.indptr.astype(np.int64), matrix.indices.astype(np.int64) + 1)
    transposed = matrix.T.tocsr()
    transposed.sort_indices()
    by_item = CSR(transposed.indptr.astype(np.int64), transposed.indices.astype(np.int64) + 1)
    return by_user, by_item


def solve_all(fixed: torch.Tensor, rows: CSR, reg: float, alpha: float, start: torch.Tensor | None = None,
              cg_steps: int = 0) -> torch.Tensor:
    """Every row's solve against `fixed` (M + 1, f): (rows.n_rows, f), in row order; exact,
    or `cg_steps` conjugate-gradient steps from `start` (rows.n_rows, f)."""
    gram = fixed.T @ fixed  # (f, f); the zero row adds nothing
    out = torch.empty(rows.n_rows, fixed.shape[1], dtype=fixed.dtype, device=fixed.device)
    for chunk in length_chunks(rows.lengths(), fixed.shape[1]):
        ids = torch.from_numpy(item_sets(rows, chunk)).to(fixed.device)  # (B, L), 0-padded
        at = torch.from_numpy(chunk).to(fixed.device)
        if cg_steps > 0 and start is not None:
            out[at] = conjugate_gradient_rows(fixed, gram, ids, reg, alpha, start[at], cg_steps)
        else:
            out[at] = solve_rows(fixed, gram, ids, reg, alpha)
    return out


def solve_rows(fixed: torch.Tensor, gram: torch.Tensor, ids: torch.Tensor, reg: float, alpha: float) -> torch.Tensor:
    """x = (gram + alpha F^T F + reg I)^-1 (1 + alpha) F^T 1 for each row's F = fixed[ids]: (B, f).

    ids (B, L) index `fixed`; 0 is its zero row, so padding adds nothing to either side.
    """
    rows = fixed[ids]  # (B, L, f)
    f = fixed.shape[1]
    eye = torch.eye(f, dtype=fixed.dtype, device=fixed.device)
    lhs = (gram + reg * eye) + alpha * torch.einsum("blf,blg->bfg", rows, rows)  # (B, f, f)
    rhs = (1.0 + alpha) * rows.sum(1)  # (B, f)
    return torch.linalg.solve(lhs, rhs)


def conjugate_gradient_rows(fixed: torch.Tensor, gram: torch.Tensor, ids: torch.Tensor, reg: float, alpha: float,
                            x: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` conjugate-gradient steps from x (B, f) on the systems `solve_rows` solves exactly.

    A v = (gram + reg I) v + alpha F^T (F v) is applied without forming A: O(L f) per row.
    """
    rows = fixed[ids]  # (B, L, f)

    def apply(v: torch.Tensor) -> torch.Tensor:  # (B, f) -> (B, f)
        return v @ gram + reg * v + alpha * torch.einsum("blf,bl->bf", rows, torch.einsum("blf,bf->bl", rows, v))

    x = x.clone()
    residual = (1.0 + alpha) * rows.sum(1) - apply(x)  # b - A x
    direction = residual.clone()
    norm = (residual * residual).sum(1, keepdim=True)  # (B, 1)
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(steps):
        product = apply(direction)
        step = norm / (direction * product).sum(1, keepdim=True).clamp_min(tiny)  # 0 once a row has converged
        x += step * direction
        residual -= step * product
        new_norm = (residual * residual).sum(1, keepdim=True)
        direction = residual + (new_norm / norm.clamp_min(tiny)) * direction
        norm = new_norm
    return x


def length_chunks(lengths: np.ndarray, factors: int) -> list[np.ndarray]:
    """Row ids in chunks of similar length, each holding at most GATHER_BUDGET gathered
    entries (rows x longest row x factors; at least one row per chunk)."""
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = np.maximum(lengths[order], 1)
    rows_budget = max(1, GATHER_BUDGET // factors)
    chunks, start = [], 0
    while start < len(order):
        # Longest possible chunk [start, end): (end - start) * sorted_lengths[end - 1] <= budget;
        # the product grows with end, so the admissible ends form a prefix.
        ends = np.arange(start + 1, len(order) + 1)
        fits = (ends - start) * sorted_lengths[ends - 1] <= rows_budget
        end = start + max(1, int(fits.sum()))
        chunks.append(order[start:end])
        start = end
    return chunks


def split_rows(ids: torch.Tensor, factors: int) -> list[torch.Tensor]:
    """A batch of padded id rows cut into consecutive pieces under GATHER_BUDGET."""
    per_piece = max(1, GATHER_BUDGET // (factors * max(1, ids.shape[1])))
    return list(ids.split(per_piece))


# Implicit-feedback ALS converges in 10-20 sweeps (implicit's default: 15 iterations).
SPEC = ModelSpec(
    name="als", kind="matrix", config_cls=ALSConfig, model_cls=ALS,
    train_defaults={"epochs": 30, "patience": 3},
)
