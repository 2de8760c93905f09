"""Two hot spots of the sequential models, written for speed and kept exact.

- `dropout`: on CPU, torch's dropout draws one Bernoulli sample per element with the
  Mersenne Twister, which cost about a fifth of a SASRec step (docs/benchmarks.md). Here
  one 64-bit draw gives four 16-bit uniforms, each compared with a threshold: the same
  inverted dropout, with the drop probability rounded to a multiple of 1/65536 (at most
  7.6e-6 away from p) and the kept values scaled by the exact inverse of the kept share.
  About 3x cheaper per element; on GPU torch's fused kernel is used as is.
- `softmax_cross_entropy`: full-softmax cross-entropy over the item table, computed in
  chunks of positions so the (positions x items) logits never exist at once. Each chunk's
  logits stay in cache, the softmax is computed once and doubles as the gradient, and the
  gradients are accumulated in the forward pass (the loss is a scalar, so nothing else
  is needed in backward). Same value and gradients as `F.cross_entropy` on the full
  logits, to float rounding.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

_LEVELS = 65536  # 16-bit uniforms
# Logits per chunk. CPU: 2 MB in fp32, so a chunk stays in the cores' L2 through the three
# products and the softmax (measured on a 13,500 x 3,417 batch: 2 MB chunks 235 ms, 16 MB
# 344 ms, unchunked 667-774 ms); GPU: large, so kernel launches stay few.
CE_CHUNK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 24}


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout; on CPU with 16-bit uniforms (see the module docstring)."""
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return x * _multiplier(x, p)


def dropout_add(residual: torch.Tensor, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """residual + dropout(x): on CPU one fused pass (addcmul) instead of three."""
    if not training or p <= 0.0:
        return residual + x
    if x.device.type != "cpu":
        return residual + F.dropout(x, p, training=True)
    return torch.addcmul(residual, x, _multiplier(x, p))


def _multiplier(x: torch.Tensor, p: float) -> torch.Tensor:
    """0 where dropped, 1 / (kept share) elsewhere: x's shape and dtype, from torch's RNG."""
    dropped = round(p * _LEVELS)
    if dropped >= _LEVELS:
        return torch.zeros_like(x)
    keep = keep_mask(x.shape, dropped, x.device)
    return (keep * (_LEVELS / (_LEVELS - dropped))).to(x.dtype)


def keep_mask(shape: torch.Size, dropped: int, device: torch.device) -> torch.Tensor:
    """bool tensor of `shape`, each element False with probability dropped / 65536, from torch's RNG."""
    n = math.prod(shape)
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    uniform16 = bits.view(torch.int16)[:n].view(shape)  # each int16 uniform over [-32768, 32767]
    return uniform16 >= (dropped - _LEVELS // 2)


def softmax_cross_entropy(
    hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, chunk_elements: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of `targets` under softmax(hidden @ table.T), column 0 (padding) excluded.

    hidden: (P, C); table: (N + 1, C), row 0 = padding; targets: (P,) ids in 1..N.
    Equals F.cross_entropy(logits with column 0 at -inf, targets) in value and gradient.
    Without autograd (evaluation) it takes the plain path.
    """
    if not (hidden.requires_grad or table.requires_grad):
        logits = hidden.float() @ table.float().T  # (P, N + 1)
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, targets)
    if chunk_elements is None:
        chunk_elements = CE_CHUNK_ELEMENTS.get(hidden.device.type, CE_CHUNK_ELEMENTS["cuda"])
    chunk = max(1, chunk_elements // table.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):  # fp32 logits, softmax and loss under AMP
        return _ChunkedSoftmaxCE.apply(hidden, table, targets, chunk)


class _ChunkedSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, table, targets, chunk):
        P = hidden.shape[0]
        w = table.float()
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_table = torch.zeros_like(w)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, P, chunk):
            h = hidden[start : start + chunk].float()  # (c, C)
            t = targets[start : start + chunk]
            rows = torch.arange(len(t), device=t.device)
            logits = h @ w.T  # (c, N + 1)
            logits[:, 0] = float("-inf")
            prob = torch.softmax(logits, dim=1)  # one fused pass; doubles as the gradient below
            loss = -prob[rows, t].log()  # (c,)
            underflow = torch.isinf(loss)
            if underflow.any():  # a target so unlikely that exp underflowed: the exact formula
                rows_u = rows[underflow]
                loss[underflow] = torch.logsumexp(logits[rows_u], dim=1) - logits[rows_u, t[underflow]]
            total += loss.sum()
            # d(mean loss)/d(logits) = (softmax - onehot) / P; the 1/P goes on the small products.
            prob[rows, t] -= 1.0
            torch.mm(prob, w, out=grad_hidden[start : start + chunk]).div_(P)
            grad_table.addmm_(prob.T, h, alpha=1.0 / P)
        ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_table.to(table.dtype))
        return (total / P).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_table = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_table * grad_loss, None, None
