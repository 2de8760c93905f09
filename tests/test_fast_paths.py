"""The fast paths of the sequential models compute what the plain ones do.

- length-bucketed batches visit every training row exactly once per epoch, reproducibly;
- right-padded causal attention without a mask, the key-masked bidirectional attention and
  the last-position-only scoring equal each row run alone, unpadded (to 1e-5 in fp32);
- the explicit attention used for attention dropout on CPU equals the fused kernel;
- the chunked full-softmax cross-entropy equals F.cross_entropy in value and gradients;
- the cheap CPU dropout drops the asked share, keeps the expectation, and follows the seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from rayrec.data.batches import recent_items, sequence_batches
from rayrec.data.types import CSR
from rayrec.models import ops
from rayrec.models.transformer import SequenceEncoder


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_rows(seed: int, users: int, n_items: int, longest: int) -> CSR:
    rng = np.random.default_rng(seed)
    return CSR.from_lists([list(rng.integers(1, n_items + 1, size=rng.integers(0, longest))) for _ in range(users)])


# --- batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("bucket", [1, 4])
def test_batches_visit_every_row_once_and_follow_the_seed(bucket):
    train = random_rows(0, 1000, 50, 60)
    eligible = set(np.flatnonzero(train.lengths() >= 2))

    def epoch(seed):
        return list(sequence_batches(train, 31, 32, np.random.default_rng(seed), bucket_batches=bucket))

    batches = epoch(7)
    rows = [tuple(r[r != 0]) for b in batches for r in b["seq"]]
    expected = [tuple(train.items[train.indptr[u]:train.indptr[u + 1]][-31:]) for u in sorted(eligible)]
    assert sorted(rows) == sorted(expected) and len(rows) == len(eligible)
    again = epoch(7)
    assert all(np.array_equal(a["seq"], b["seq"]) for a, b in zip(batches, again))
    assert not all(np.array_equal(a["seq"], b["seq"]) for a, b in zip(batches, epoch(8)))
    if bucket > 1:
        # Weights make every position count the same: they average 1 and follow real positions.
        weights = np.array([b["weight"] for b in batches])
        positions = np.array([(b["seq"] != 0).sum() for b in batches])
        assert weights.mean() == pytest.approx(1.0)
        np.testing.assert_allclose(weights, positions / positions.mean())


def test_bucketing_cuts_padding():
    train = random_rows(1, 4000, 50, 200)
    padding = {}
    for bucket in (1, 8):
        batches = list(sequence_batches(train, 201, 128, np.random.default_rng(0), bucket_batches=bucket))
        cells = sum(b["seq"].size for b in batches)
        padding[bucket] = 1 - sum((b["seq"] != 0).sum() for b in batches) / cells
    assert padding[1] > 0.4 and padding[8] < 0.15, padding


def test_recent_items_are_right_padded_most_recent_last():
    history = CSR.from_lists([[1, 2, 3, 4, 5], [7], []])
    np.testing.assert_array_equal(recent_items(history, [0, 1, 2], 3), [[3, 4, 5], [7, 0, 0], [0, 0, 0]])
    assert recent_items(history, [1, 2], 3).shape == (2, 1)  # as wide as the longest row


# --- attention and scoring ----------------------------------------------------------------


def encoder(causal: bool, **kw) -> SequenceEncoder:
    torch.manual_seed(0)
    return SequenceEncoder(41, 16, 2, 2, 0.0, 30, causal=causal, init_std=0.1, **kw).eval()


def padded_batch(seed: int, rows: int = 24, width: int = 20) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width + 1, size=rows)
    seq = torch.as_tensor(rng.integers(1, 41, size=(rows, width)))
    return seq.masked_fill(torch.arange(width)[None, :] >= torch.as_tensor(lengths)[:, None], 0)


@pytest.mark.parametrize("causal,layout", [(True, "pre"), (False, "pre"), (True, "sasrec")])
def test_padded_batch_equals_each_row_alone(causal, layout):
    model = encoder(causal, layout=layout)
    seq = padded_batch(0)
    with torch.no_grad():
        states = model(seq)  # (B, L, C)
        last = model(seq, last_only=True)  # (B, C)
        for r in range(len(seq)):
            items = seq[r][seq[r] != 0][None]  # (1, n): no padding at all
            alone = model(items)[0]
            n = items.shape[1]
            torch.testing.assert_close(states[r, :n], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(last[r], alone[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal,layout", [(True, "pre"), (False, "pre"), (True, "sasrec")])
def test_scoring_in_row_chunks_equals_one_pass(causal, layout, monkeypatch):
    """last_only runs rows in cache-sized chunks; each row's state is the one-pass state."""
    from rayrec.models import transformer

    model = encoder(causal, layout=layout)
    seq = padded_batch(1, rows=50)
    with torch.no_grad():
        whole = model(seq, last_only=True)
        monkeypatch.setitem(transformer.LAST_ONLY_POSITIONS, "cpu", 7 * seq.shape[1])  # chunks of 7 rows
        chunked = model(seq, last_only=True)
    assert chunked.shape == whole.shape == (50, whole.shape[1])
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)


def test_causal_states_equal_the_masked_reference():
    """The unmasked right-padded kernel equals attention with an explicit causal + padding mask."""
    model = encoder(True)
    seq = padded_batch(1)
    B, L = seq.shape
    real = seq != 0
    with torch.no_grad():
        fast = model(seq)
        # Reference: every block with a materialised (B, 1, L, L) mask through SDPA.
        x = model.item_emb(seq) + model.pos_emb(((real.sum(1, keepdim=True) - 1 - torch.arange(L)).clamp(min=0)))
        mask = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
        mask = mask | torch.eye(L, dtype=torch.bool)[None, None]
        for block in model.blocks:
            h = block.norm1(x)
            q, k, v = (t.view(B, L, 2, 8).transpose(1, 2) for t in block.qkv(h).split(16, dim=-1))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + block.proj(a.transpose(1, 2).reshape(B, L, 16))
            x = x + block.ffn_out(F.gelu(block.ffn_in(block.norm2(x))))
        reference = model.norm(x)
    torch.testing.assert_close(fast[real], reference[real], atol=1e-5, rtol=1e-5)


def test_sasrec_layout_equals_its_written_form():
    """layout="sasrec": h = LN1(x); x = h + Attn(q=h, k=v=x); x = LN2(x); x = x + FFN_relu(x); emb * sqrt(d)."""
    model = encoder(True, layout="sasrec")
    seq = padded_batch(3)
    B, L = seq.shape
    real = seq != 0
    with torch.no_grad():
        fast = model(seq)
        recency = (real.sum(1, keepdim=True) - 1 - torch.arange(L)).clamp(min=0)
        x = model.item_emb(seq) * 16**0.5 + model.pos_emb(recency)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        for block in model.blocks:
            h = block.norm1(x)
            wq, wk, wv = block.qkv.weight.split(16)
            bq, bk, bv = block.qkv.bias.split(16)
            q, k, v = (t.view(B, L, 2, 8).transpose(1, 2) for t in (h @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv))
            scores = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~causal, float("-inf"))
            a = scores.softmax(-1) @ v
            x = block.norm2(h + block.proj(a.transpose(1, 2).reshape(B, L, 16)))
            x = x + block.ffn_out(torch.relu(block.ffn_in(x)))
        reference = model.norm(x)
    torch.testing.assert_close(fast[real], reference[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal,layout", [(True, "pre"), (False, "pre"), (True, "sasrec")])
def test_explicit_attention_for_dropout_equals_the_fused_kernel(causal, layout, monkeypatch):
    seq = padded_batch(2)
    fused = encoder(causal, layout=layout)
    explicit = encoder(causal, attn_dropout=0.5, layout=layout)
    explicit.load_state_dict(fused.state_dict())
    # With the dropout itself made the identity, only the attention path differs.
    monkeypatch.setattr(ops, "dropout", lambda x, p, training: x)
    fused.train(), explicit.train()
    real = seq != 0
    torch.testing.assert_close(explicit(seq)[real], fused(seq)[real], atol=1e-5, rtol=1e-5)


# --- loss and dropout ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [7 * 51, 1 << 22])
def test_chunked_cross_entropy_equals_the_plain_one(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(300, 16, requires_grad=True)
    table = torch.randn(51, 16, requires_grad=True)
    targets = torch.randint(1, 51, (300,))
    loss = ops.softmax_cross_entropy(hidden, table, targets, chunk_elements=chunk)
    grads = torch.autograd.grad(3.0 * loss, (hidden, table))
    logits = hidden @ table.T
    logits = torch.cat([torch.full_like(logits[:, :1], float("-inf")), logits[:, 1:]], dim=1)
    ref = F.cross_entropy(logits, targets)
    ref_grads = torch.autograd.grad(3.0 * ref, (hidden, table))
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_chunked_cross_entropy_survives_an_underflowing_target():
    hidden = torch.tensor([[200.0, 0.0], [1.0, 0.0]], requires_grad=True)
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    targets = torch.tensor([2, 1])  # row 0: target logit -200 vs 200, exp underflows in fp32
    loss = ops.softmax_cross_entropy(hidden, table, targets)
    logits = (hidden @ table.T)[:, 1:]
    ref = F.cross_entropy(logits, targets - 1)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_cpu_dropout_drops_p_keeps_the_mean_and_follows_the_seed():
    x = torch.ones(400_000, requires_grad=True)
    torch.manual_seed(3)
    y = ops.dropout(x, 0.3, True)
    assert (y == 0).float().mean().item() == pytest.approx(0.3, abs=0.003)
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0) and torch.equal(x.grad, y.detach())
    residual = torch.randn(400_000)
    torch.manual_seed(3)
    torch.testing.assert_close(ops.dropout_add(residual, x, 0.3, True), residual + y)
    torch.manual_seed(3)
    assert torch.equal(ops.dropout(x, 0.3, True), y)
    assert ops.dropout(x, 0.3, False) is x
