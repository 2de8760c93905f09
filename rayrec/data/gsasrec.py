"""The gSASRec authors' pre-split leave-one-out folder format (`data.format=gsasrec`)."""

from __future__ import annotations

import numpy as np

from rayrec.data import readers
from rayrec.data.sources import Source, sha256_bytes
from rayrec.data.types import CSR, SplitData
from rayrec.errors import UserError

# Bump when a change to this reader changes the result for the same files (it is part of
# the fingerprint): 2 declares the 'complete' test group.
GSASREC_VERSION = 2
GSASREC_FILES = ("train_input.txt", "val_input.txt", "val_output.txt", "test_output.txt")
GSASREC_LAYOUT = (
    "a folder with train_input.txt (line i: user i's items), val_input.txt/val_output.txt "
    "(validation users' input and target) and test_output.txt (every user's test target)"
)


def _int_lines(data: bytes, path: str) -> list[list[int]]:
    try:
        return [[int(t) for t in line.split()] for line in data.decode("utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"cannot read {path} as format 'gsasrec': expected {GSASREC_LAYOUT}") from None


def gsasrec_source(directory: str, name: str | None = None) -> Source:
    """The gSASRec authors' pre-split leave-one-out folder (see shared/data/README.md).

    Per user the full sequence is s[:-3] + a + b + c for validation users and s[:-2] + c
    for the others (their second-to-last item is not in the files). Train is val_input
    (= train_input + a) for validation users, so the validation target b is predicted from
    exactly the gSASRec validation input, and the test history train + b is the user's
    sequence without its last item; for the others train is train_input and they have no
    validation target. Items keep their ids (1..3416 for ML-1M); no k-core is applied.

    Only the validation users' test input (train + b) is the complete sequence before the
    test target; the others miss their second-to-last item. They form the test group
    'complete', whose test metrics are reported beside all users' (`test_complete`).
    """
    base = directory.rstrip("/")
    blobs = {f: readers.read_bytes(f"{base}/{f}") for f in GSASREC_FILES}

    def read_split() -> SplitData:
        train_rows, val_inputs, val_outputs, test_outputs = (_int_lines(blobs[f], f"{base}/{f}") for f in GSASREC_FILES)
        n_users = len(train_rows)
        one_target_each = all(len(t) == 1 for t in test_outputs + val_outputs)
        if len(test_outputs) != n_users or len(val_inputs) != len(val_outputs) or not one_target_each:
            raise UserError(f"cannot read {base} as format 'gsasrec': expected {GSASREC_LAYOUT} (line counts disagree or a target line has several items)")
        # val_input lines carry no user id: a line is the user's train_input plus one item.
        user_of = {tuple(row): u for u, row in enumerate(train_rows)}
        valid_rows: list[list[int]] = [[] for _ in range(n_users)]
        for val_input, val_output in zip(val_inputs, val_outputs):
            user = user_of.get(tuple(val_input[:-1]))
            if user is None:
                raise UserError(
                    f"cannot read {base} as format 'gsasrec': a val_input.txt line extends no train_input.txt line"
                )
            train_rows[user] = val_input
            valid_rows[user] = val_output
        train, valid, test = CSR.from_lists(train_rows), CSR.from_lists(valid_rows), CSR.from_lists(test_outputs)
        n_items = int(max(train.items.max(initial=0), valid.items.max(initial=0), test.items.max(initial=0)))
        complete = np.flatnonzero(valid.lengths() > 0)  # the validation users
        n_valid_users = len(complete)
        info = {
            "counts": {"read": train.nnz + valid.nnz + test.nnz},
            "split": {
                "kind": "loo",
                "presplit": True,
                "users_without_valid": n_users - n_valid_users,
                "users_without_test": int((test.lengths() == 0).sum()),
                "users_without_train": int((train.lengths() == 0).sum()),
            },
            "test_groups": {"complete": "users whose test input is complete (the validation users)"},
        }
        return SplitData(name or base, n_users, n_items, train, valid, test, True, "", info,
                         test_groups={"complete": complete})

    identity = {"kind": "gsasrec", "version": GSASREC_VERSION, **{f: sha256_bytes(b) for f, b in blobs.items()}}
    return Source(name=name or base, location=base, format="gsasrec", identity=identity, read_split=read_split)


