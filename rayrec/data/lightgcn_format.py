"""Reader for datasets published in the LightGCN layout (Gowalla, Yelp2018, Amazon-Book, LastFM).

These datasets come already split, 80/20 at random per user (anchors.md, "LightGCN
protocol"), in one of three folder layouts:

    (a) s_adj_mat.npz + test.txt   the symmetric (users + items)^2 adjacency of the TRAINING
                                   edges (scipy CSR); users are rows 0..U-1, items follow.
    (b) train.txt + test.txt       one line per user: `user item item ...`, 0-based ids.
    (c) data1.txt + test1.txt      LastFM (LightGCN-PyTorch): rows `user<TAB>item<TAB>weight`.

In (a) and (b) test.txt is one line per user, 0-based like train.txt. In (c) the ids are
compacted over both files (LightGCN-PyTorch ships them 1-based). Item ids become
1..n_items (0-based id + 1; 0 is padding, see rayrec.data.types).

The files hold no validation set, and selection must be on validation, never on test
(field-lessons §8). So a seeded share `valid_ratio` of each user's training items is carved
out as validation (per user: round(ratio * n), keeping at least one training item). With
`valid_ratio=0` every validation row is empty and the split is the published one; train a
chosen config that way for figures comparable with anchors.md. Rows are not in time order
(`ordered=False`), so only graph and static models accept these datasets.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from rayrec.data.types import CSR, SplitData
from rayrec.errors import UserError

# (layout name, training file, test file), in order of preference: a train.txt is the
# source the adjacency was derived from, so it wins when a folder holds both.
LAYOUTS = (
    ("lines", "train.txt", "test.txt"),
    ("adjacency", "s_adj_mat.npz", "test.txt"),
    ("pairs", "data1.txt", "test1.txt"),
)
LAYOUT_FILES = tuple(dict.fromkeys(f for layout in LAYOUTS for f in layout[1:]))
EXPECTED = (
    "expected one of: s_adj_mat.npz + test.txt (Gowalla: train adjacency, test lines `user item item ...`), "
    "train.txt + test.txt (lines `user item item ...`, 0-based), "
    "data1.txt + test1.txt (LastFM: rows `user<TAB>item<TAB>weight`)"
)
FORMAT_VERSION = 1  # bump when parsing or the validation carve changes, so fingerprints change too


def load_lightgcn_dir(path: str, name: str, valid_ratio: float = 0.1, seed: int = 0) -> SplitData:
    """Load a LightGCN-layout folder (local path or fsspec URL) as a SplitData.

    valid_ratio: share of each user's training items moved to validation (seeded by `seed`);
    0 keeps the published split with empty validation rows.
    """
    import fsspec

    if not 0.0 <= valid_ratio < 1.0:
        raise UserError(f"valid_ratio must be in [0, 1), got {valid_ratio}")
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.isdir(root):
        raise UserError(f"dataset folder not found: {path}; {EXPECTED}")
    present = {Path(p).name for p in fs.ls(root, detail=False)}
    layout = next((lay for lay in LAYOUTS if lay[1] in present and lay[2] in present), None)
    if layout is None:
        partial = [f"{lay[1]} without {lay[2]}" for lay in LAYOUTS if lay[1] in present and lay[2] not in present]
        found = f"found {partial[0]}" if partial else f"found {', '.join(sorted(present)) or 'nothing'}"
        raise UserError(f"no LightGCN-format data in {path} ({found}); {EXPECTED}")
    kind, train_name, test_name = layout
    train_bytes = fs.cat_file(f"{root.rstrip('/')}/{train_name}")
    test_bytes = fs.cat_file(f"{root.rstrip('/')}/{test_name}")

    if kind == "pairs":
        train_u, train_i, test_u, test_i, n_users, n_items = _read_pairs(train_bytes, test_bytes, path)
    else:
        test_u, test_i = _read_lines(test_bytes, f"{path}/{test_name}")
        if kind == "adjacency":
            train_u, train_i, n_users, n_items = _read_adjacency(train_bytes, test_u, f"{path}/{train_name}")
        else:
            train_u, train_i = _read_lines(train_bytes, f"{path}/{train_name}")
            n_users = int(max(train_u.max(initial=-1), test_u.max(initial=-1))) + 1
            n_items = int(max(train_i.max(initial=-1), test_i.max(initial=-1))) + 1
        bad = (test_u >= n_users) | (test_i >= n_items)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise UserError(
                f"{path}/{test_name}: user {test_u[j]} / item {test_i[j]} is outside the training graph "
                f"({n_users} users, {n_items} items)"
            )
    if n_users == 0 or n_items == 0:
        raise UserError(f"{path}: no interactions in {train_name}; {EXPECTED}")

    train = _unique_rows(train_u, train_i + 1, n_users, n_items)
    test = _unique_rows(test_u, test_i + 1, n_users, n_items)
    train, valid = carve_validation(train, valid_ratio, seed)

    digest = hashlib.sha256()
    digest.update(f"lightgcn-format v{FORMAT_VERSION} {kind}".encode())
    for fname, blob in ((train_name, train_bytes), (test_name, test_bytes)):
        digest.update(f"\0{fname}\0{len(blob)}\0".encode())
        digest.update(blob)
    digest.update(json.dumps({"valid_ratio": valid_ratio, "seed": seed}, sort_keys=True).encode())
    return SplitData(
        name=name, n_users=n_users, n_items=n_items, train=train, valid=valid, test=test,
        ordered=False, fingerprint=digest.hexdigest(),
        info={"source": str(path), "format": "lightgcn", "layout": f"{train_name} + {test_name}",
              "valid_ratio": valid_ratio, "seed": seed, "train_edges": train.nnz + valid.nnz},
    )


def carve_validation(train: CSR, ratio: float, seed: int) -> tuple[CSR, CSR]:
    """Move round(ratio * n) random items of each user's row (at most n - 1) into validation:
    the same seeded draw as the ratio split (splits.random_rank_in_user). Both outputs keep
    the input's order."""
    from rayrec.data.splits import holdout_quota, random_rank_in_user

    n_rows = train.n_rows
    if ratio <= 0 or train.nnz == 0:
        return train, CSR(np.zeros(n_rows + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
    lengths = train.lengths()
    users = train.rows()
    to_valid = random_rank_in_user(users, n_rows, seed) < holdout_quota(lengths, ratio, lengths - 1)[users]
    return (
        CSR.from_pairs(users[~to_valid], train.items[~to_valid], n_rows),
        CSR.from_pairs(users[to_valid], train.items[to_valid], n_rows),
    )


def _read_lines(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """`user item item ...` lines -> (users, items) int64 pairs, 0-based as in the file."""
    users, counts, tokens = [], [], []
    for n, line in enumerate(blob.decode().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if not all(p.isdigit() for p in parts):
            raise UserError(f"{where} line {n}: expected `user item item ...` non-negative integers, got {line[:80]!r}")
        users.append(int(parts[0]))
        counts.append(len(parts) - 1)
        tokens.extend(parts[1:])
    items = np.array(tokens, dtype=np.int64) if tokens else np.zeros(0, dtype=np.int64)
    return np.repeat(np.array(users, dtype=np.int64), counts), items


def _read_adjacency(blob: bytes, test_users: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Training pairs from the user-item block of a symmetric bipartite adjacency.

    The number of users is not stored: it is the first node after the last one with an
    edge to a later node (user rows link forward to items, item rows back to users), and at
    least one more than the largest user id in the test file.
    """
    import scipy.sparse as sp

    try:
        adj = sp.load_npz(io.BytesIO(blob)).tocsr()
    except (ValueError, OSError, KeyError) as exc:
        raise UserError(f"{where} is not a scipy sparse .npz matrix: {exc}") from None
    n_nodes = adj.shape[0]
    if adj.shape[0] != adj.shape[1]:
        raise UserError(f"{where}: the adjacency must be square (users + items), got shape {adj.shape}")
    rows = np.repeat(np.arange(n_nodes, dtype=np.int64), np.diff(adj.indptr))
    forward = rows[adj.indices > rows]
    n_users = max(int(forward.max(initial=-1)) + 1, int(test_users.max(initial=-1)) + 1)
    block = adj[:n_users, n_users:]
    if adj[:n_users, :n_users].nnz or adj[n_users:, n_users:].nnz:
        raise UserError(f"{where}: not a bipartite user-item adjacency (edges inside the user or item block)")
    block.sum_duplicates()
    users = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(block.indptr))
    return users, block.indices.astype(np.int64), n_users, n_nodes - n_users


def _read_pairs(train_blob: bytes, test_blob: bytes, path: str):
    """LastFM rows `user item weight` -> compact 0-based ids shared by train and test.

    LightGCN-PyTorch ships these files 1-based (users 1..1892 with 12 unused, items
    1..4489); compacting the ids over train and test makes the result independent of the
    base and leaves no empty users or items.
    """
    arrays = []
    for fname, blob in (("data1.txt", train_blob), ("test1.txt", test_blob)):
        try:
            pairs = np.loadtxt(io.BytesIO(blob), usecols=(0, 1), dtype=np.int64, ndmin=2)
        except ValueError as exc:
            raise UserError(f"{path}/{fname}: expected rows `user<TAB>item<TAB>weight` of integer ids: {exc}") from None
        arrays.append(pairs.reshape(-1, 2))
    train, test = arrays
    user_ids, users = np.unique(np.concatenate([train[:, 0], test[:, 0]]), return_inverse=True)
    item_ids, items = np.unique(np.concatenate([train[:, 1], test[:, 1]]), return_inverse=True)
    n = len(train)
    return users[:n], items[:n], users[n:], items[n:], len(user_ids), len(item_ids)


def _unique_rows(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> CSR:
    """CSR of distinct (user, item) pairs, items sorted within each row."""
    keys = np.sort(users.astype(np.int64) * (n_items + 1) + items)
    first = np.ones(len(keys), dtype=bool)  # sort-based unique: numpy's hashed np.unique is slower here
    first[1:] = keys[1:] != keys[:-1]
    keys = keys[first]
    return CSR.from_pairs(keys // (n_items + 1), keys % (n_items + 1), n_users)
