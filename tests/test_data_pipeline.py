"""Preprocessing, splits, the synthetic dataset, fingerprints, the split cache and downloads."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import subprocess
import sys
import threading
import time
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rayrec.config import DataConfig
from rayrec.data import datasets, load_split, readers, synthetic
from rayrec.data.preprocess import Interactions, k_core, preprocess
from rayrec.data.splits import split_interactions
from rayrec.errors import UserError

SHARED = datasets.shared_data_dir()


def frame(rows, columns=("user", "item", "timestamp")) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(columns))


def pairs_of(csr) -> set[tuple[int, int]]:
    return set(zip(csr.rows().tolist(), csr.items.tolist()))


# --- preprocessing ---------------------------------------------------------------------


def test_k_core_is_iterative():
    # k = 2. Rows: x-a x-b y-a y-b y-c z-c. Pass 1 drops z (one row); that leaves item c
    # with one row, so pass 2 drops y-c; y still has a and b, so it stays. A single pass
    # would wrongly keep y-c.
    user = np.array([0, 0, 1, 1, 1, 2])
    item = np.array([0, 1, 0, 1, 2, 2])
    assert k_core(user, item, user_core=2, item_core=2).tolist() == [True, True, True, True, False, False]


def test_k_core_can_cascade_to_nothing():
    # x-a x-b y-a y-c z-c: b and z go first, then a and c fall to one row each, then all.
    user = np.array([0, 0, 1, 1, 2])
    item = np.array([0, 1, 0, 2, 2])
    assert not k_core(user, item, user_core=2, item_core=2).any()


def test_k_core_one_pass_fixed_point_and_disabled():
    user = np.array([0, 0, 1, 1])
    item = np.array([0, 1, 0, 1])
    assert k_core(user, item, 2, 2).all()
    assert k_core(np.array([0]), np.array([0]), 0, 0).all()


def test_preprocess_orders_dedups_and_reindexes():
    raw = frame(
        [
            ("u2", "b", 5.0),
            ("u1", "c", 3.0),
            ("u1", "a", 3.0),  # ties with the row above: file order decides
            ("u1", "c", 1.0),  # the earliest (u1, c): kept; the later copy at t=3 is dropped
            ("u2", "a", 9.0),
        ]
    )
    data = preprocess(raw, None, 0, 0)
    assert (data.n_users, data.n_items) == (2, 3)
    # users sorted: u1 -> 0, u2 -> 1; items sorted a, b, c -> 1, 2, 3 (0 is padding)
    assert list(zip(data.user.tolist(), data.item.tolist())) == [(0, 3), (0, 1), (1, 2), (1, 1)]
    assert data.timestamp.tolist() == [1.0, 3.0, 5.0, 9.0]
    assert data.counts == {"read": 5, "dedup": 4, "k_core": 4}


def test_min_rating_keeps_ratings_at_or_above_threshold():
    raw = frame([(1, 1, 1.0, 5), (1, 2, 2.0, 4), (2, 1, 3.0, 3.5)], ("user", "item", "timestamp", "rating"))
    data = preprocess(raw, 4.0, 0, 0)
    assert data.counts == {"read": 3, "min_rating": 2, "dedup": 2, "k_core": 2}
    assert data.n_users == 1 and data.item.tolist() == [1, 2]


def test_min_rating_without_rating_column_is_a_user_error():
    with pytest.raises(UserError, match="min_rating=4.0 needs a rating column.*user, item, timestamp"):
        preprocess(frame([(1, 1, 0.0)]), 4.0, 0, 0)


def test_empty_after_k_core_reports_counts_and_suggests(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("1 1\n1 2\n2 3\n")
    with pytest.raises(UserError) as err:
        load_split(DataConfig(name=str(path), format="pairs", cache_dir=str(tmp_path / "c")))
    message = str(err.value)
    assert "3 after read" in message and "0 after k_core" in message
    assert "lower data.user_core (now 5), data.item_core (now 5)" in message
    assert "\n" not in message


# --- splits ----------------------------------------------------------------------------


def interactions(lengths: list[int], timestamps: bool = True) -> Interactions:
    """User u has lengths[u] distinct items, given in time order."""
    user = np.repeat(np.arange(len(lengths)), lengths)
    item = np.concatenate([np.arange(1, n + 1) for n in lengths])
    ts = np.arange(len(user), dtype=np.float64) if timestamps else None
    return Interactions(user, item, ts, len(lengths), int(max(lengths)))


def test_leave_one_out_holds_out_last_two_and_handles_short_users():
    data = interactions([5, 3, 2, 1])
    train, valid, test, info = split_interactions(data, "loo", True, 0, 0.1, 0.2)
    assert [train.row(u).tolist() for u in range(4)] == [[1, 2, 3], [1], [1], [1]]
    assert [valid.row(u).tolist() for u in range(4)] == [[4], [2], [], []]
    assert [test.row(u).tolist() for u in range(4)] == [[5], [3], [2], []]
    assert info == {"kind": "loo", "users_without_valid": 2, "users_without_test": 1, "users_without_train": 0}


def test_leave_one_out_on_unordered_data_is_seeded_random():
    data = interactions([20] * 30, timestamps=False)
    a = split_interactions(data, "loo", False, 1, 0.1, 0.2)
    b = split_interactions(data, "loo", False, 1, 0.1, 0.2)
    c = split_interactions(data, "loo", False, 2, 0.1, 0.2)
    assert pairs_of(a[2]) == pairs_of(b[2]) != pairs_of(c[2])
    assert pairs_of(a[2]) != {(u, 20) for u in range(30)}  # not simply the last rows


def test_ratio_split_sizes_rounding_and_seed():
    data = interactions([10, 5, 2, 1])
    train, valid, test, info = split_interactions(data, "ratio", True, 0, 0.1, 0.2)
    # n=10: test 2, valid 1; n=5: test 1, valid 0.5 -> 1 (half up); n=2: test 0.4 -> 0, valid 0;
    # n=1: nothing held out (every user keeps a training item).
    assert test.lengths().tolist() == [2, 1, 0, 0]
    assert valid.lengths().tolist() == [1, 1, 0, 0]
    assert train.lengths().tolist() == [7, 3, 2, 1]
    assert info["users_without_train"] == 0 and info["users_without_test"] == 2
    # Train rows keep time order; the three parts partition each user's items.
    assert all(np.all(np.diff(train.row(u)) > 0) for u in range(4))
    assert pairs_of(train) | pairs_of(valid) | pairs_of(test) == set(zip(data.user.tolist(), data.item.tolist()))
    again = split_interactions(data, "ratio", True, 0, 0.1, 0.2)
    other = split_interactions(interactions([50] * 20), "ratio", True, 1, 0.1, 0.2)
    same_seed = split_interactions(interactions([50] * 20), "ratio", True, 1, 0.1, 0.2)
    assert pairs_of(again[2]) == pairs_of(test)
    assert pairs_of(other[2]) == pairs_of(same_seed[2])
    assert pairs_of(other[2]) != pairs_of(split_interactions(interactions([50] * 20), "ratio", True, 2, 0.1, 0.2)[2])


def test_ratio_never_leaves_a_user_without_training_items():
    data = interactions([2, 3, 4])
    train, valid, test, _ = split_interactions(data, "ratio", True, 0, 0.45, 0.5)
    assert (train.lengths() >= 1).all()
    assert (train.lengths() + valid.lengths() + test.lengths()).tolist() == [2, 3, 4]


def test_lightgcn_validation_carve_holds_out_what_the_ratio_split_would():
    """One per-user random hold-out serves both: same seed and ratio, same items held out."""
    from rayrec.data.lightgcn_format import carve_validation

    data = interactions([10, 5, 2, 1, 7])
    train, valid, _, _ = split_interactions(data, "ratio", True, 3, 0.3, 0.0)
    carved_train, carved_valid = carve_validation(
        split_interactions(data, "ratio", True, 3, 0.0, 0.0)[0], 0.3, seed=3)
    assert pairs_of(carved_valid) == pairs_of(valid) and pairs_of(carved_train) == pairs_of(train)
    assert valid.lengths().tolist() == [3, 2, 1, 0, 2]


def test_temporal_split_cuts_global_time():
    data = interactions([4, 6])  # timestamps 0..9 over both users
    train, valid, test, info = split_interactions(data, "temporal", True, 0, 0.2, 0.2)
    ts_of = dict(zip(zip(data.user.tolist(), data.item.tolist()), data.timestamp.tolist()))
    assert sorted(ts_of[p] for p in pairs_of(test)) == [8.0, 9.0]
    assert sorted(ts_of[p] for p in pairs_of(valid)) == [6.0, 7.0]
    assert max(ts_of[p] for p in pairs_of(train)) == 5.0
    assert info["users_without_test"] == 1 and info["test_from_timestamp"] == 8.0


def test_temporal_split_needs_timestamps(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("".join(f"{u} 1 2 3 4 5\n" for u in range(6)))
    cfg = DataConfig(name=str(path), format="sequences", split="temporal", user_core=0, item_core=0, cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="temporal needs timestamps.*use data.split=loo"):
        load_split(cfg)


def test_temporal_users_without_training_are_kept_and_warned(tmp_path, caplog):
    path = tmp_path / "x.csv"
    path.write_text("user,item,timestamp\n1,1,1\n1,2,2\n1,3,3\n1,4,4\n2,1,9\n2,2,10\n")
    cfg = DataConfig(
        name=str(path), split="temporal", user_core=0, item_core=0, valid_ratio=0.0, test_ratio=0.35, cache_dir=str(tmp_path)
    )
    split = load_split(cfg)
    assert split.n_users == 2 and split.info["split"]["users_without_train"] == 1
    assert split.test.row(1).tolist() == [1, 2]
    assert "1 user(s) have no training interactions" in caplog.text


# --- the synthetic dataset -------------------------------------------------------------


def test_synthetic_is_deterministic_and_fast():
    start = time.perf_counter()
    a = synthetic.generate_interactions(1000, 400, 30, seed=3)
    assert time.perf_counter() - start < 1.0
    b = synthetic.generate_interactions(1000, 400, 30, seed=3)
    c = synthetic.generate_interactions(1000, 400, 30, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["item"], c["item"])
    assert a["item"].min() >= 1 and a["item"].max() <= 400
    # Timestamps increase within each user.
    same_user = a["user"][1:] == a["user"][:-1]
    assert (np.diff(a["timestamp"])[same_user] >= 0).all()


def test_synthetic_has_sequential_structure_popularity_misses(tmp_path):
    split = load_split(DataConfig(cache_dir=str(tmp_path)))
    assert split.info["synthetic"] is True and split.ordered
    assert split.n_users == 1000 and split.info["n_interactions"] > 20_000
    # A first-order Markov model (counts of item -> next item in training) against popularity,
    # both predicting each user's validation target from training data only.
    n = split.n_items + 1
    rows, items = split.train.rows(), split.train.items
    follows = rows[1:] == rows[:-1]
    transitions = np.zeros((n, n))
    np.add.at(transitions, (items[:-1][follows], items[1:][follows]), 1.0)
    popularity = split.item_counts().astype(float)
    users = split.eval_users("valid")
    last = split.train.items[split.train.indptr[users + 1] - 1]
    target = split.valid.items[split.valid.indptr[users]]

    def ndcg_at_10(scores):
        scores = scores.copy()
        scores[:, 0] = -np.inf
        seen_rows, seen_items = split.train.rows(), split.train.items
        position = np.full(split.n_users, -1)
        position[users] = np.arange(len(users))
        keep = position[seen_rows] >= 0
        scores[position[seen_rows[keep]], seen_items[keep]] = -np.inf
        rank = (scores > scores[np.arange(len(users)), target][:, None]).sum(axis=1)
        return np.where(rank < 10, 1.0 / np.log2(rank + 2), 0.0).mean()

    markov_scores = transitions[last] + 1e-6 * popularity
    top1 = (markov_scores[:, 1:].argmax(axis=1) + 1 == target).mean()
    markov, pop = ndcg_at_10(markov_scores), ndcg_at_10(np.tile(popularity, (len(users), 1)))
    assert 0.3 <= top1 <= 0.6, top1  # predictable from the previous item, not deterministic
    assert markov >= 3 * pop, (markov, pop)
    # Long-tailed popularity: the top 10% of items draw a large share of interactions.
    counts = np.sort(popularity[1:])[::-1]
    assert counts[: len(counts) // 10].sum() / counts.sum() > 0.25


def test_importing_rayrec_data_stays_light():
    code = "import sys, rayrec.data; print(sorted(m for m in ('pandas', 'torch', 'pyarrow', 'fsspec') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- fingerprint and cache -------------------------------------------------------------


def test_fingerprint_is_stable_and_tracks_parameters(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), split="ratio")
    fp = load_split(cfg).fingerprint
    assert load_split(cfg).fingerprint == fp and len(fp) == 64
    source = datasets.synthetic_source(cfg)
    assert datasets.fingerprint(source, dataclasses.replace(cfg, seed=1)) != fp
    assert datasets.fingerprint(source, dataclasses.replace(cfg, test_ratio=0.3)) != fp
    assert datasets.fingerprint(source, dataclasses.replace(cfg, item_core=3)) != fp
    assert datasets.fingerprint(source, dataclasses.replace(cfg, cache_dir="/elsewhere")) == fp
    # The same in a fresh process (no per-process hash salt leaks in).
    code = (
        "from rayrec.config import DataConfig; from rayrec.data import datasets; "
        "cfg = DataConfig(split='ratio'); print(datasets.fingerprint(datasets.synthetic_source(cfg), cfg))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == fp


def test_file_fingerprint_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    text = "".join(f"{u} {i}\n" for u in range(6) for i in range(1, 7))
    a.write_text(text)
    b.write_text(text)

    def fp(path):
        return load_split(DataConfig(name=str(path), format="pairs", cache_dir=str(tmp_path / "c"))).fingerprint

    assert fp(a) == fp(b)
    b.write_text(text + "0 7\n")
    assert fp(a) != fp(b)


def test_second_load_reads_the_cache(tmp_path, monkeypatch):
    path = tmp_path / "s.txt"
    path.write_text("".join(f"{u} " + " ".join(str(i) for i in range(1, 8)) + "\n" for u in range(8)))
    cfg = DataConfig(name=str(path), format="sequences", cache_dir=str(tmp_path / "cache"))
    first = load_split(cfg)

    def fail(*args, **kwargs):
        raise AssertionError("parsed again despite the cache")

    monkeypatch.setattr(readers, "parse_interactions", fail)
    second = load_split(cfg)
    assert second.fingerprint == first.fingerprint and second.summary() == first.summary()
    for part in ("train", "valid", "test"):
        assert np.array_equal(getattr(second, part).indptr, getattr(first, part).indptr)
        assert np.array_equal(getattr(second, part).items, getattr(first, part).items)
    assert second.info["counts"] == first.info["counts"]
    entries = list((tmp_path / "cache" / "splits").iterdir())
    assert [e.name for e in entries] == [first.fingerprint]  # no temporary folders left
    assert sorted(p.name for p in entries[0].iterdir()) == ["meta.json", "test.parquet", "train.parquet", "valid.parquet"]


def test_synthetic_cache_skips_generation(tmp_path, monkeypatch):
    cfg = DataConfig(cache_dir=str(tmp_path), synthetic_users=50, synthetic_items=40)
    first = load_split(cfg)
    monkeypatch.setattr(synthetic, "generate_interactions", lambda *a, **k: pytest.fail("generated again"))
    assert load_split(cfg).fingerprint == first.fingerprint


def test_damaged_cache_is_rebuilt(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), synthetic_users=50, synthetic_items=40)
    first = load_split(cfg)
    (tmp_path / "splits" / first.fingerprint / "train.parquet").write_bytes(b"junk")
    again = load_split(cfg)
    assert np.array_equal(again.train.items, first.train.items)


def test_cache_dir_env_and_unwritable_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYREC_CACHE", str(tmp_path / "from-env"))
    load_split(DataConfig(synthetic_users=20, synthetic_items=20))
    assert (tmp_path / "from-env" / "splits").is_dir()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match=f"cache directory {blocker}/cache is not writable"):
        load_split(DataConfig(cache_dir=str(blocker / "cache")))


# --- downloads against a loopback HTTP server ------------------------------------------


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A folder served on 127.0.0.1, set as RAYREC_DATA_MIRROR."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("RAYREC_DATA_MIRROR", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    yield root
    server.shutdown()
    server.server_close()


def tiny_ml100k_zip(folder: Path) -> str:
    """A zip laid out like GroupLens' ml-100k.zip: 6 users x 6 items, all rated. Returns its sha256."""
    buffer = io.BytesIO()
    rows = "".join(f"{u}\t{i}\t{1 + (u + i) % 5}\t{1000 + 10 * u + i}\n" for u in range(1, 7) for i in range(1, 7))
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("ml-100k/u.data", rows)
    (folder / "ml-100k.zip").write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def test_download_verifies_and_caches(tmp_path, mirror, monkeypatch):
    digest = tiny_ml100k_zip(mirror)
    monkeypatch.setitem(datasets.DOWNLOADS, "ml-100k", dataclasses.replace(datasets.DOWNLOADS["ml-100k"], sha256=digest))
    cache = tmp_path / "cache"
    split = load_split(DataConfig(name="ml-100k", cache_dir=str(cache)))
    assert (split.n_users, split.n_items, split.info["n_interactions"]) == (6, 6, 36)
    assert split.info["format"] == "grouplens" and split.ordered
    assert (cache / "downloads" / "ml-100k.zip").read_bytes() == (mirror / "ml-100k.zip").read_bytes()
    # A different split needs the archive again: it comes from the cache, not the server.
    (mirror / "ml-100k.zip").unlink()
    other = load_split(DataConfig(name="ml-100k", split="ratio", user_core=0, item_core=0, cache_dir=str(cache)))
    assert other.info["n_interactions"] == 36


def test_download_checksum_mismatch_leaves_nothing(tmp_path, mirror):
    tiny_ml100k_zip(mirror)  # not the real archive: the real sha256 cannot match
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"download http://127.0.0.1:\d+/ml-100k.zip has sha256 .* expected 552a5ef9"):
        load_split(DataConfig(name="ml-100k", cache_dir=str(cache)))
    assert list((cache / "downloads").iterdir()) == []
    assert list((cache / "splits").iterdir()) == []


def test_download_failure_names_the_url(tmp_path, mirror):
    with pytest.raises(UserError, match=r"cannot download http://127.0.0.1:\d+/ml-1m.zip: .*RAYREC_DATA_MIRROR"):
        load_split(DataConfig(name="ml-1m", cache_dir=str(tmp_path / "cache")))
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []


@pytest.mark.skipif(not (SHARED / "ml-100k/ml-100k.zip").exists(), reason="shared ml-100k.zip not present")
def test_download_of_the_real_ml100k_archive(tmp_path, mirror):
    (mirror / "ml-100k.zip").write_bytes((SHARED / "ml-100k/ml-100k.zip").read_bytes())
    split = load_split(DataConfig(name="ml-100k", user_core=0, item_core=0, cache_dir=str(tmp_path)))
    assert (split.n_users, split.n_items, split.info["n_interactions"]) == (943, 1682, 100_000)


def test_data_file_read_by_url(tmp_path, mirror):
    (mirror / "seqs.txt").write_text("".join(f"{u} " + " ".join(str(i) for i in range(1, 7)) + "\n" for u in range(6)))
    base = os.environ["RAYREC_DATA_MIRROR"]
    split = load_split(DataConfig(name=f"{base}seqs.txt", format="sequences", cache_dir=str(tmp_path / "c")))
    assert (split.n_users, split.n_items, split.test.nnz) == (6, 6, 6)
    with pytest.raises(UserError, match="not found: http://127.0.0.1.*/absent.txt"):
        load_split(DataConfig(name=f"{base}absent.txt", format="sequences", cache_dir=str(tmp_path / "c")))
