"""BERT4Rec and GRU4Rec: shapes, masking, what scoring reads, learning a planted sequence,
config validation. Tiny data built here; everything runs on CPU in seconds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rayrec.config import build_config
from rayrec.data.batches import recent_items
from rayrec.data.types import CSR, SplitData
from rayrec.errors import UserError
from rayrec.models import build_model, get_model_spec
from rayrec.models.bert4rec import BERT4Rec, BERT4RecConfig
from rayrec.models.gru4rec import GRU4Rec, GRU4RecConfig

N_USERS, N_ITEMS = 50, 30


def planted_data() -> SplitData:
    """Every user walks the cycle 1 -> 2 -> ... -> 30 -> 1 from their own start: item i is
    always followed by i % 30 + 1. Train holds 8-12 steps, then one validation and one test item."""
    train, valid, test = [], [], []
    for u in range(N_USERS):
        walk = [(u + k) % N_ITEMS + 1 for k in range(8 + u % 5 + 2)]
        train.append(walk[:-2])
        valid.append(walk[-2:-1])
        test.append(walk[-1:])
    return SplitData(
        name="planted", n_users=N_USERS, n_items=N_ITEMS, train=CSR.from_lists(train),
        valid=CSR.from_lists(valid), test=CSR.from_lists(test), ordered=True, fingerprint="planted",
    )


@pytest.fixture(scope="module")
def data() -> SplitData:
    return planted_data()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are too small for intra-op threads: on a busy 2-core machine, OpenMP
    workers spinning for a core made the learning tests 50x slower (40 s instead of 0.8 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_bert(data, **kw) -> BERT4Rec:
    cfg = BERT4RecConfig(**{"hidden": 32, "max_len": 16, "dropout": 0.1, **kw})
    cfg.validate()
    return BERT4Rec(cfg, data)


def small_gru(data, **kw) -> GRU4Rec:
    cfg = GRU4RecConfig(**{"embedding": 32, "hidden": 32, "max_len": 16, "dropout": 0.1, **kw})
    cfg.validate()
    return GRU4Rec(cfg, data)


MAKERS = {"bert4rec": small_bert, "gru4rec": small_gru}


def first_batch(model, data, batch_size=16):
    batch = next(iter(model.train_batches(data, batch_size, np.random.default_rng(0))))
    return {k: torch.as_tensor(v) for k, v in batch.items()}


def score_users(model, history: CSR, users) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        inputs = {k: torch.as_tensor(v) for k, v in model.eval_inputs(history, np.asarray(users)).items()}
        return model.score(inputs)


def fit(model, data, steps: int, lr: float = 1e-2, batch_size: int = N_USERS) -> None:
    """Plain AdamW steps over the model's own training batches (the shared trainer's job, minus the extras)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    done = 0
    while done < steps:
        for batch in model.train_batches(data, batch_size, rng):
            loss = model.loss({k: torch.as_tensor(v) for k, v in batch.items()})
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                return


def top1_accuracy(model, data) -> float:
    users = data.eval_users("valid")
    scores = score_users(model, data.history("valid"), users)
    scores[:, 0] = float("-inf")
    targets = torch.as_tensor(data.valid.items[data.valid.indptr[users]])
    return (scores.argmax(1) == targets).float().mean().item()


# --- both models -------------------------------------------------------------------------


@pytest.mark.parametrize("name", MAKERS)
def test_registered_with_transformer_clipping(name):
    spec = get_model_spec(name)
    assert spec.name == name and spec.kind == "sequential"
    assert spec.train_defaults["grad_clip"] == 5.0 and spec.train_defaults["patience"] in (10, 20)
    cfg = build_config(name)
    assert cfg.train.grad_clip == 5.0
    assert isinstance(cfg.model, spec.config_cls)


@pytest.mark.parametrize("name", MAKERS)
def test_score_shape_and_finite_loss(name, data):
    torch.manual_seed(0)
    model = MAKERS[name](data)
    scores = score_users(model, data.train, [0, 1, 2])
    assert scores.shape == (3, N_ITEMS + 1)
    assert torch.isfinite(scores).all()
    model.train()
    loss = model.loss(first_batch(model, data))
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("name", MAKERS)
def test_one_optimiser_step_changes_parameters(name, data):
    torch.manual_seed(0)
    model = MAKERS[name](data)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    model.loss(first_batch(model, data)).backward()
    for key, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{key} gets no gradient"
    opt.step()
    for key, p in model.named_parameters():
        assert not torch.equal(before[key], p.detach()), f"{key} did not change"


# Sized for the planted data (histories of at most 12 items), without dropout, one batch
# of all 50 users per step. BERT4Rec starts from init_std 0.1: at 0.02 the attention to the
# neighbouring position, which cloze training must discover, takes several hundred steps.
LEARNERS = {
    "bert4rec": lambda data: small_bert(data, max_len=13, dropout=0.0, init_std=0.1),
    "gru4rec": lambda data: small_gru(data, max_len=13, dropout=0.0),
}


@pytest.mark.parametrize("name", LEARNERS)
def test_learns_planted_next_item(name, data):
    torch.manual_seed(0)
    model = LEARNERS[name](data)
    assert top1_accuracy(model, data) < 0.3
    fit(model, data, steps=150)
    assert top1_accuracy(model, data) > 0.8


@pytest.mark.parametrize("name", MAKERS)
def test_trains_through_the_shared_trainer(name, data):
    Trainer = pytest.importorskip("rayrec.train.trainer", reason="the shared trainer is not there yet").Trainer
    cfg = build_config(name, overrides={
        "train.epochs": 2, "train.batch_size": 16, "train.device": "cpu", "train.lr": 1e-2,
        "model.hidden": 16, "model.max_len": 16,
    })
    result = Trainer(cfg, data).fit()
    assert result.epochs_run == 2 and len(result.history) == 2
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    assert 0.0 <= result.history[-1]["val_ndcg@10"] <= 1.0


@pytest.mark.parametrize("name", MAKERS)
def test_unordered_data_is_refused(name, data):
    unordered = dataclasses.replace(data, ordered=False)
    with pytest.raises(UserError, match="sequential"):
        build_model(name, build_config(name).model, unordered)


# --- BERT4Rec ----------------------------------------------------------------------------


def random_right_padded(rng, rows: int, length: int, n_items: int) -> torch.Tensor:
    lengths = rng.integers(1, length + 1, size=rows)
    seq = rng.integers(1, n_items + 1, size=(rows, length))
    seq[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return torch.as_tensor(seq)


def last_column(seq: torch.Tensor) -> torch.Tensor:
    """(B,) column of each right-padded row's most recent item."""
    return (seq != 0).sum(1) - 1


def test_bert4rec_masks_about_mask_prob_of_real_positions_and_never_padding(data):
    torch.manual_seed(0)
    model = small_bert(data, mask_prob=0.2, last_mask_ratio=0.0, max_len=40)
    seq = random_right_padded(np.random.default_rng(0), 3000, 40, N_ITEMS)
    inputs, masked = model.cloze(seq)
    real = seq != 0
    mask_token = N_ITEMS + 1
    assert torch.equal(inputs == mask_token, masked)
    assert not (masked & ~real).any(), "padding was masked"
    assert torch.equal(inputs[~masked], seq[~masked]), "unmasked positions changed"
    assert masked.any(1).all(), "a row has no target"
    # Expected masked count of a row of n items: n*p, plus its last item when the draw left
    # none masked (probability (1-p)^n). Binomial noise over ~60k positions is ~0.002.
    n = real.sum(1).double()
    expected = (0.2 * n + 0.8**n).sum() / n.sum()
    observed = masked.sum() / real.sum()
    assert abs(observed.item() - expected.item()) < 0.01
    assert 0.19 < observed.item() < 0.24


def test_bert4rec_last_mask_ratio_masks_only_the_last_item(data):
    torch.manual_seed(0)
    seq = random_right_padded(np.random.default_rng(1), 500, 20, N_ITEMS)
    rows, last = torch.arange(len(seq)), last_column(seq)
    _, masked = small_bert(data, last_mask_ratio=1.0, max_len=20).cloze(seq)
    assert masked[rows, last].all() and masked.sum() == len(seq)
    _, masked = small_bert(data, last_mask_ratio=0.3, max_len=20).cloze(seq)
    last_only = masked[rows, last] & (masked.sum(1) == 1)
    # 30% of rows by design, plus rows whose draw masked only the last item or nothing (then
    # the last item is masked): (1 - p)^(n - 1) for a row of n items. 500 rows: std ~0.022.
    n = (seq != 0).sum(1).double()
    expected = 0.3 + 0.7 * (0.8 ** (n - 1)).mean().item()
    assert abs(last_only.float().mean().item() - expected) < 0.07


def test_bert4rec_scoring_input_ends_with_mask_token(data):
    model = small_bert(data, max_len=6)
    users = np.arange(N_USERS)
    seq = model.eval_inputs(data.train, users)["seq"]
    assert seq.shape == (N_USERS, 6)
    # Right-padded: the last 5 items, then [MASK] right after them, then padding.
    n = (seq != 0).sum(1)
    assert (seq[np.arange(N_USERS), n - 1] == N_ITEMS + 1).all() and (seq == N_ITEMS + 1).sum() == N_USERS
    items = recent_items(data.train, users, 5)
    np.testing.assert_array_equal(np.where(seq[:, :5] == N_ITEMS + 1, 0, seq[:, :5]), items)
    # Only item ids are scored: padding column 0 and items 1..n_items, never the mask token.
    assert score_users(model, data.train, users).shape == (N_USERS, N_ITEMS + 1)


def test_bert4rec_scores_do_not_depend_on_batch_width(data):
    """A batch is as wide as its longest row; extra padding columns change no score."""
    torch.manual_seed(0)
    model = small_bert(data, max_len=40).eval()
    users = np.array([0, 1, 2])
    trimmed = torch.as_tensor(model.eval_inputs(data.train, users)["seq"])
    full = torch.cat([trimmed, torch.zeros(3, 40 - trimmed.shape[1], dtype=trimmed.dtype)], dim=1)
    assert trimmed.shape[1] < full.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model.score({"seq": trimmed}), model.score({"seq": full}))


# --- GRU4Rec -----------------------------------------------------------------------------


def test_gru4rec_scores_from_the_most_recent_item(data):
    torch.manual_seed(0)
    model = small_gru(data, max_len=4)
    history = CSR.from_lists([
        [1, 2, 3, 4, 5],
        [1, 2, 3, 4, 6],  # differs from row 0 only in the last item
        [9, 2, 3, 4, 5],  # differs from row 0 only in an item older than max_len
        [2, 3, 4, 5],
    ])
    s = score_users(model, history, [0, 1, 2, 3])
    assert not torch.allclose(s[0], s[1])
    torch.testing.assert_close(s[0], s[2], rtol=0, atol=0)
    torch.testing.assert_close(s[0], s[3], rtol=0, atol=0)


def test_gru4rec_states_equal_those_of_the_unpadded_sequence(data):
    """With right padding each row's states are independent of its padding."""
    torch.manual_seed(0)
    model = small_gru(data, layers=2, hidden=24).eval()
    seq = random_right_padded(np.random.default_rng(0), 20, 9, N_ITEMS)
    wider = torch.cat([seq, torch.zeros(20, 5, dtype=seq.dtype)], dim=1)
    with torch.no_grad():
        states, wide_states = model(seq), model(wider)
        for r in range(len(seq)):
            items = seq[r][seq[r] != 0]
            unpadded = model.proj(model.gru(model.item_emb(items[None]))[0])[0]  # (n, E)
            torch.testing.assert_close(states[r, : len(items)], unpadded)
            torch.testing.assert_close(wide_states[r, : len(items)], unpadded)


@pytest.mark.parametrize("loss", ["ce", "bpr", "bce", "sampled_softmax"])
def test_gru4rec_losses_run_and_backpropagate(loss, data):
    torch.manual_seed(0)
    model = small_gru(data, loss=loss, negatives=4)
    model.train()
    value = model.loss(first_batch(model, data))
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert model.item_emb.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", ["bpr", "sampled_softmax"])
def test_bert4rec_sampled_losses_run(loss, data):
    # Negatives are drawn from item_loss's table, rows 0..n_items, so never the mask token.
    torch.manual_seed(0)
    model = small_bert(data, loss=loss, negatives=8)
    model.train()
    value = model.loss(first_batch(model, data))
    assert value.dim() == 0 and torch.isfinite(value) and value.item() > 0
    value.backward()  # a loss that trains: the item table gets a gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# --- config validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, key, value, message",
    [
        ("bert4rec", "mask_prob", 0.0, "mask_prob"),
        ("bert4rec", "mask_prob", 1.0, "mask_prob"),
        ("bert4rec", "last_mask_ratio", 1.5, "last_mask_ratio"),
        ("bert4rec", "heads", 3, "heads"),
        ("bert4rec", "blocks", 0, "blocks"),
        ("bert4rec", "dropout", 1.0, "dropout"),
        ("bert4rec", "max_len", 1, "max_len"),
        ("bert4rec", "loss", "hinge", "loss"),
        ("gru4rec", "layers", 0, "layers"),
        ("gru4rec", "embedding", 0, "embedding"),
        ("gru4rec", "hidden", 0, "hidden"),
        ("gru4rec", "negatives", 0, "negatives"),
        ("gru4rec", "dropout", -0.1, "dropout"),
        ("gru4rec", "loss", "hinge", "loss"),
        ("gru4rec", "init_std", 0.0, "init_std"),
    ],
)
def test_bad_config_values_raise_user_error(name, key, value, message):
    with pytest.raises(UserError, match=message):
        build_config(name, overrides={f"model.{key}": value})


def test_defaults_match_the_anchors():
    cfg = build_config("bert4rec").model
    assert (cfg.mask_prob, cfg.blocks, cfg.heads, cfg.hidden, cfg.max_len) == (0.2, 2, 2, 64, 200)
    gru = build_config("gru4rec").model
    assert (gru.embedding, gru.hidden, gru.layers, gru.loss) == (64, 64, 1, "ce")
