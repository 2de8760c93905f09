"""Readers and named datasets: every format on tiny files, bad input, the real shared files."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rayrec.config import DataConfig
from rayrec.data import datasets, load_split, readers
from rayrec.errors import UserError

SHARED = datasets.shared_data_dir()


def read_interactions(path: str, fmt: str, columns: dict[str, str] | None = None) -> pd.DataFrame:
    """Read and parse `path` (local path or fsspec URL) with the `fmt` parser, as datasets do."""
    return readers.parse_interactions(readers.read_bytes(path), fmt, path, columns)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_grouplens_reads_tab_separated_rows(tmp_path):
    path = write(tmp_path / "u.data", "1\t10\t5\t100\n2\t20\t3\t99\n")
    frame = read_interactions(path, "grouplens")
    assert frame.columns.tolist() == ["user", "item", "rating", "timestamp"]
    assert frame["user"].tolist() == [1, 2] and frame["item"].tolist() == [10, 20]
    assert frame["rating"].tolist() == [5.0, 3.0] and frame["timestamp"].tolist() == [100.0, 99.0]
    assert readers.is_ordered(frame, "grouplens")


def test_ml1m_reads_double_colon_rows(tmp_path):
    path = write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
    frame = read_interactions(path, "ml-1m")
    assert frame["item"].tolist() == [1193, 661]
    assert frame["timestamp"].tolist() == [978300760.0, 978302109.0]


def test_inter_maps_recbole_header(tmp_path):
    text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\ti1\t4\t10\nu2\ti1\t2\t11\n"
    frame = read_interactions(write(tmp_path / "x.inter", text), "inter")
    assert frame.columns.tolist() == ["user", "item", "timestamp", "rating"]
    assert frame["user"].tolist() == ["u1", "u2"] and frame["rating"].tolist() == [4.0, 2.0]


def test_inter_without_timestamp_column_is_unordered(tmp_path):
    frame = read_interactions(write(tmp_path / "x.inter", "user_id:token\titem_id:token\n1\t2\n"), "inter")
    assert frame.columns.tolist() == ["user", "item"]
    assert not readers.is_ordered(frame, "inter")


def test_pairs_keep_line_order_as_time_order(tmp_path):
    frame = read_interactions(write(tmp_path / "p.txt", "1 5\n1 3\n2 7\n"), "pairs")
    assert frame.columns.tolist() == ["user", "item"]
    assert frame["item"].tolist() == [5, 3, 7]
    assert readers.is_ordered(frame, "pairs")


def test_sequences_expand_one_line_per_user(tmp_path):
    frame = read_interactions(write(tmp_path / "s.txt", "1 5 3 9\n2 7\n3\n"), "sequences")
    assert frame["user"].tolist() == [1, 1, 1, 2]
    assert frame["item"].tolist() == [5, 3, 9, 7]
    assert readers.is_ordered(frame, "sequences")


def test_csv_uses_column_mapping(tmp_path):
    path = write(tmp_path / "x.csv", "uid,mid,when,stars\na,x,3,1.5\nb,y,1,4\n")
    frame = read_interactions(path, "csv", {"user": "uid", "item": "mid", "timestamp": "when", "rating": "stars"})
    assert frame.columns.tolist() == ["user", "item", "timestamp", "rating"]
    assert frame["timestamp"].tolist() == [3.0, 1.0]


def test_numeric_ids_read_as_integers_so_2_sorts_before_10(tmp_path):
    path = write(tmp_path / "x.csv", "user,item\n10,2\n2,10\n")
    frame = read_interactions(path, "csv")
    assert frame["user"].dtype == np.int64 and frame["item"].dtype == np.int64
    inter = read_interactions(write(tmp_path / "x.inter", "user_id:token\titem_id:token\nu10\t7\n"), "inter")
    assert inter["user"].tolist() == ["u10"] and inter["item"].tolist() == [7]


def test_csv_without_timestamp_is_unordered_and_dates_parse(tmp_path):
    frame = read_interactions(write(tmp_path / "x.csv", "user,item\n1,2\n"), "csv")
    assert not readers.is_ordered(frame, "csv")
    dated = read_interactions(write(tmp_path / "d.csv", "user,item,timestamp\n1,2,1970-01-02\n"), "csv")
    assert dated["timestamp"].tolist() == [86400.0]


def test_csv_without_timestamps_loads_unordered(tmp_path):
    path = write(tmp_path / "x.csv", "user,item\n" + "".join(f"{u},{i}\n" for u in range(5) for i in range(5)))
    split = load_split(DataConfig(name=path, user_core=0, item_core=0, cache_dir=str(tmp_path / "c")))
    assert not split.ordered and split.info["ordered"] is False
    assert split.test.nnz == 5 and split.valid.nnz == 5


def test_parquet_and_gzip_through_fsspec(tmp_path):
    pd.DataFrame({"u": [1, 2], "i": [3, 4], "t": [5, 6]}).to_parquet(tmp_path / "x.parquet")
    frame = read_interactions(str(tmp_path / "x.parquet"), "parquet", {"user": "u", "item": "i", "timestamp": "t"})
    assert frame["item"].tolist() == [3, 4] and readers.is_ordered(frame, "parquet")
    with gzip.open(tmp_path / "u.data.gz", "wt") as fh:
        fh.write("1\t2\t3\t4\n")
    assert readers.infer_format(str(tmp_path / "u.data.gz")) == "grouplens"
    assert read_interactions(f"file://{tmp_path}/u.data.gz", "grouplens")["item"].tolist() == [2]


@pytest.mark.parametrize(
    "name, fmt",
    [("u.data", "grouplens"), ("a/ratings.dat", "ml-1m"), ("x.inter", "inter"), ("x.csv", "csv"),
     ("x.tsv.gz", "csv"), ("x.parquet", "parquet"), ("x.txt", None)],
)
def test_infer_format_from_file_name(name, fmt):
    assert readers.infer_format(name) == fmt


# --- bad input: one clear UserError line each -----------------------------------------


def test_missing_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope" / "u.data")
    with pytest.raises(UserError, match="not found: .*nope/u.data"):
        load_split(DataConfig(name=missing, cache_dir=str(tmp_path / "cache")))


def test_garbled_file_names_format_and_layout(tmp_path):
    path = write(tmp_path / "u.data", "user,item,rating\n1,2,3\n")
    with pytest.raises(UserError, match="as format 'grouplens': expected tab-separated 'user item rating timestamp'"):
        read_interactions(path, "grouplens")
    with pytest.raises(UserError, match="non-numeric rating"):
        read_interactions(write(tmp_path / "v.data", "1\t2\tgood\t4\n"), "grouplens")
    with pytest.raises(UserError, match="as format 'sequences'"):
        read_interactions(write(tmp_path / "s.txt", "a,b,c\nd,e\n"), "sequences")
    with pytest.raises(UserError, match="as format 'parquet'"):
        read_interactions(write(tmp_path / "x.parquet", "not parquet"), "parquet")


def test_missing_column_names_it_and_the_columns_present(tmp_path):
    path = write(tmp_path / "x.csv", "uid,mid\n1,2\n")
    with pytest.raises(UserError, match=r"'user'.* not in .*x.csv; columns present: uid, mid"):
        read_interactions(path, "csv")
    with pytest.raises(UserError, match=r"data.columns.timestamp='ts' is not in .*columns present: uid, mid"):
        read_interactions(path, "csv", {"user": "uid", "item": "mid", "timestamp": "ts"})
    with pytest.raises(UserError, match="item_id.*columns present: user_id, rating"):
        read_interactions(write(tmp_path / "x.inter", "user_id:token\trating:float\n1\t2\n"), "inter")


def test_unknown_format_lists_valid_formats(tmp_path):
    path = write(tmp_path / "x.txt", "1 2\n")
    with pytest.raises(UserError, match="unknown data.format 'jsonl'; valid: .*grouplens.*sequences"):
        load_split(DataConfig(name=path, format="jsonl", cache_dir=str(tmp_path / "c")))
    with pytest.raises(UserError, match="cannot tell the format .*set data.format"):
        load_split(DataConfig(name=path, cache_dir=str(tmp_path / "c")))


def test_unknown_named_dataset_lists_named_ones(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'ml-10m'.*valid: .*ml-100k.*synthetic"):
        load_split(DataConfig(name="ml-10m", cache_dir=str(tmp_path)))


def test_format_with_named_dataset_is_rejected(tmp_path):
    with pytest.raises(UserError, match="data.format='csv' applies to paths"):
        load_split(DataConfig(name="synthetic", format="csv", cache_dir=str(tmp_path)))


def test_missing_shared_dataset_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYREC_SHARED_DATA", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="'beauty' reads .*empty/beauty/Beauty.txt.*RAYREC_SHARED_DATA"):
        load_split(DataConfig(name="beauty", cache_dir=str(tmp_path / "c")))


# --- gsasrec pre-split folders ---------------------------------------------------------


def test_gsasrec_folder_builds_leave_one_out(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    write(folder / "train_input.txt", "1 2 3\n4 5\n2 6\n")
    write(folder / "val_input.txt", "4 5 7\n")  # user 1 (0-based): train + one more item
    write(folder / "val_output.txt", "8\n")
    write(folder / "test_output.txt", "9\n3\n1\n")
    split = load_split(DataConfig(name=str(folder), cache_dir=str(tmp_path / "c")))  # format inferred
    assert (split.n_users, split.n_items, split.ordered) == (3, 9, True)
    assert split.train.row(1).tolist() == [4, 5, 7] and split.valid.row(1).tolist() == [8]
    assert split.valid.lengths().tolist() == [0, 1, 0]
    assert split.test.row(0).tolist() == [9]
    assert split.history("test").row(1).tolist() == [4, 5, 7, 8]
    with pytest.raises(UserError, match="comes already split .*data.split must be loo"):
        load_split(DataConfig(name=str(folder), split="ratio", cache_dir=str(tmp_path / "c")))
    # A model whose own default is a ratio split (NCF, the graph models) takes the shipped
    # leave-one-out split of ml-1m-gsasrec and of the gsasrec format without being told.
    from rayrec.config import build_config

    for model in ("ncf", "lightgcn", "sasrec"):
        assert build_config(model, {"data": {"name": "ml-1m-gsasrec"}}).data.split == "loo"
        assert build_config(model, {"data": {"name": str(folder), "format": "gsasrec"}}).data.split == "loo"
    assert build_config("ncf", {"data": {"name": "lastfm"}}).data.split == "ratio"


def test_gsasrec_reports_test_metrics_on_users_with_complete_test_input(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from rayrec.cli import app

    folder = tmp_path / "g"
    folder.mkdir()
    write(folder / "train_input.txt", "1 2 3\n1 2\n1 4\n2 4\n")
    write(folder / "val_input.txt", "1 2 3\n")  # user 1 is the only validation user
    write(folder / "val_output.txt", "5\n")
    write(folder / "test_output.txt", "4\n6\n2\n1\n")
    cache = str(tmp_path / "c")
    split = load_split(DataConfig(name=str(folder), cache_dir=cache))
    assert split.test_groups["complete"].tolist() == [1]
    assert load_split(DataConfig(name=str(folder), cache_dir=cache)).test_groups["complete"].tolist() == [1]  # cached

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "pop", "--data", str(folder), "--output", str(out), "--no-progress",
                                      "--set", "train.save_per_user=true"])
    assert result.exit_code == 0, result.output
    assert "test_complete:" in result.output and "(1 users)" in result.output
    summary = yaml.safe_load((out / "summary.yaml").read_text())
    # Popularity (training counts 1:3 2:3 3:2 4:2 5:0 6:0) ranks every user's target first,
    # except user 1's: with 1, 2, 3 and 5 seen, item 6 comes second, after item 4.
    second = 1 / np.log2(3)
    assert summary["test_complete"]["n_users"] == 1
    assert summary["test_complete"]["ndcg@10"] == pytest.approx(second)
    assert summary["test_complete"]["mrr@10"] == pytest.approx(0.5)
    assert summary["test"]["n_users"] == 4 and summary["test"]["ndcg@10"] == pytest.approx((3 + second) / 4)
    # train.save_per_user: one row per (split, user), the group as a column; means = the summary.
    per_user = pd.read_parquet(out / "per_user.parquet").sort_values(["split", "user"])
    test = per_user[per_user["split"] == "test"]
    assert test["user"].tolist() == [0, 1, 2, 3] and test["in_complete"].tolist() == [False, True, False, False]
    assert test["ndcg@10"].tolist() == pytest.approx([1, second, 1, 1])
    assert test["rank"].tolist() == [1, 2, 1, 1]
    assert test[test["in_complete"]]["ndcg@10"].mean() == pytest.approx(summary["test_complete"]["ndcg@10"])
    valid = per_user[per_user["split"] == "valid"]
    assert valid["user"].tolist() == [1] and valid["ndcg@10"].iloc[0] == pytest.approx(summary["valid"]["ndcg@10"])
    # Datasets that declare no group report all users only.
    plain = tmp_path / "plain"
    seqs = write(tmp_path / "seqs.txt", "".join(f"{u} " + " ".join(str(1 + (u + i) % 7) for i in range(6)) + "\n"
                                               for u in range(1, 9)))
    result = CliRunner().invoke(app, ["train", "pop", "--data", seqs, "--format", "sequences", "--output", str(plain),
                                      "--no-progress", "--set", "data.user_core=0", "--set", "data.item_core=0"])
    assert result.exit_code == 0, result.output
    assert not [k for k in yaml.safe_load((plain / "summary.yaml").read_text()) if k.startswith("test_")]


# --- the real shared files (skipped where the folder is absent) ------------------------


def needs(relative: str):
    return pytest.mark.skipif(not (SHARED / relative).exists(), reason=f"shared data {SHARED / relative} not present")


@needs("ml-100k/ml-100k.inter")
def test_real_ml100k_inter_before_k_core(tmp_path):
    split = load_split(
        DataConfig(name=str(SHARED / "ml-100k/ml-100k.inter"), user_core=0, item_core=0, cache_dir=str(tmp_path))
    )
    assert (split.n_users, split.n_items, split.info["n_interactions"]) == (943, 1682, 100_000)
    assert split.info["format"] == "inter" and split.ordered


@needs("ml-1m-gsasrec/train_input.txt")
def test_real_ml1m_gsasrec(tmp_path):
    split = load_split(DataConfig(name="ml-1m-gsasrec", cache_dir=str(tmp_path)))
    assert (split.n_users, split.n_items) == (6040, 3416)
    assert len(split.eval_users("valid")) == 512 and len(split.eval_users("test")) == 6040
    assert split.test_groups["complete"].tolist() == split.eval_users("valid").tolist()  # complete test input
    # README: 994,083 of ML-1M's interactions are recoverable from the files.
    assert split.info["n_interactions"] == 994_083


@needs("beauty/Beauty.txt")
def test_real_beauty(tmp_path):
    split = load_split(DataConfig(name="beauty", cache_dir=str(tmp_path)))
    assert (split.n_users, split.n_items, split.info["n_interactions"]) == (22_363, 12_101, 198_502)
    assert split.info["format"] == "sequences" and split.info["split"]["kind"] == "loo"
    users = split.eval_users("test")
    assert len(users) == 22_363
    # No test target was seen in training (de-duplication + leave-one-out).
    width = split.n_items + 1
    test_pairs = users * width + split.test.items[split.test.indptr[users]]
    assert not np.isin(test_pairs, split.train.rows() * width + split.train.items).any()


def test_shared_data_dir_defaults_next_to_repo(monkeypatch):
    monkeypatch.delenv("RAYREC_SHARED_DATA", raising=False)
    repo_root = Path(datasets.__file__).resolve().parents[2]
    assert datasets.shared_data_dir() == repo_root.parent / "shared" / "data"
    monkeypatch.setenv("RAYREC_SHARED_DATA", os.sep + "elsewhere")
    assert datasets.shared_data_dir() == Path(os.sep + "elsewhere")
