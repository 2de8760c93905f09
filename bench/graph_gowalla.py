"""LightGCN and BPR-MF on Gowalla (the LightGCN split in ../shared/data/gowalla), on this machine.

    .venv/bin/python bench/graph_gowalla.py --model lightgcn --epochs 30 --max-minutes 10
    .venv/bin/python bench/graph_gowalla.py --model bprmf --epochs 30 --max-minutes 10
    .venv/bin/python bench/graph_gowalla.py --model lightgcn --epochs 2 --set train.limit_train_batches=60  # timing only

LightGCN protocol (anchors.md): the published 80/20 split (810,128 training edges, all of
them trained on: data.valid_ratio=0), BPR with one uniform negative, embedding 64, L2 1e-4
on the batch's ego embeddings, batch 2048, 3 layers (LightGCN), Adam at a constant lr 1e-3
(AdamW with weight decay 0, the graph models' default clipping 1.0). Full ranking over
40,981 items with training items masked; every test item of a user is relevant; Recall@20
and NDCG@20 as LightGCN defines them (README, Evaluation).

The published split has no validation set, so this is a learning curve on test, as the
LightGCN reference code prints it: the figure reported is the LAST evaluated epoch's, with
no selection on test. Seconds per epoch = training + that evaluation. Figures only, never
pass/fail. `--epochs` caps the run; `--max-minutes` is a time box: no epoch starts that
would (at the last epoch's pace) end past it. For timing alone, `--set
train.limit_train_batches=N` caps the steps per epoch: edges/s stays a true rate and the
full-epoch seconds are extrapolated from it. The load average is printed with every epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import load_average, print_machine  # noqa: E402

ANCHORS = {  # anchors.md, Gowalla, LightGCN protocol: (Recall@20, NDCG@20)
    "lightgcn": ("LightGCN paper (converged, ~1,000 epochs)", 0.1830, 0.1554),
    "bprmf": ("MF-BPR, BARS (300 negatives)", 0.1627, 0.1378),
    "pop": ("none (the baseline every model must beat)", float("nan"), float("nan")),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(ANCHORS), required=True)
    p.add_argument("--epochs", type=int, default=1000, help="epochs at most (default 1000: the time box decides)")
    p.add_argument("--max-minutes", type=float, default=10.0)
    p.add_argument("--eval-every", type=int, default=1, help="evaluate test every N epochs (and after the last)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--eval-batch-size", type=int, default=4096,
                   help="users per full-ranking batch: 4096 x 40,982 fp32 scores = 0.7 GB (default 4096)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config override key=value")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    import torch

    from rayrec.config import build_config, parse_overrides
    from rayrec.data import load_split
    from rayrec.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    machine = print_machine(f"{args.model} on gowalla")
    overrides = {
        "data.name": "gowalla", "data.split": "ratio", "data.valid_ratio": 0.0,  # pop's default split is loo
        **({"model.hidden": 64, "model.reg": 1e-4, "model.negatives": 1} if args.model != "pop" else {}),
        "train.batch_size": args.batch_size, "train.lr": args.lr, "train.schedule": "constant",
        "train.warmup_epochs": 0.0, "train.weight_decay": 0.0, "train.epochs": args.epochs,
        "train.eval_batch_size": args.eval_batch_size, "train.ks": [20], "train.metric": "recall@20",
        "train.device": "cpu", "train.num_threads": args.threads,
        **({"model.layers": 3} if args.model == "lightgcn" else {}),
        **parse_overrides(args.sets),
    }
    cfg = build_config(args.model, overrides=overrides)
    start = time.perf_counter()
    data = load_split(cfg.data)
    print(f"   {data.summary()}; loaded in {time.perf_counter() - start:.1f}s")
    print(f"   config: {json.dumps({k: v for k, v in cfg.flat().items() if k.startswith(('model.', 'train.'))})}")
    trainer = Trainer(cfg, data)
    deadline = time.perf_counter() + 60 * args.max_minutes
    epochs, last = [], None
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        loss, _ = trainer.train_epoch(epoch) if not trainer.model.closed_form else (float("nan"), 0.0)
        train_seconds = time.perf_counter() - t0
        final = epoch + 1 == args.epochs or trainer.model.closed_form  # popularity: one evaluation
        row = {"epoch": epoch + 1, "train_seconds": train_seconds, "loss": loss}
        pace = train_seconds + (epochs[-1]["eval_seconds"] if epochs and "eval_seconds" in epochs[-1] else 0.0)
        out_of_time = time.perf_counter() + pace > deadline
        if (epoch + 1) % args.eval_every == 0 or final or out_of_time:
            t1 = time.perf_counter()
            test = trainer.evaluate("test")  # learning curve on test; nothing is selected on it
            row.update(eval_seconds=time.perf_counter() - t1, recall=test["recall@20"], ndcg=test["ndcg@20"],
                       coverage=test["coverage@20"], users=int(test["n_users"]))
            last = row
        row["load"] = load_average()
        epochs.append(row)
        shown = (f"  eval {row['eval_seconds']:5.1f}s  test recall@20 {row['recall']:.4f} ndcg@20 {row['ndcg']:.4f}"
                 f" coverage@20 {row['coverage']:.3f}") if "recall" in row else ""
        print(f"   epoch {row['epoch']:>4}  train {train_seconds:6.1f}s  loss {loss:.4f}{shown}  load {row['load']}",
              flush=True)
        if out_of_time or final:
            break
    evaluated = [e for e in epochs if "eval_seconds" in e]
    limit = cfg.train.limit_train_batches
    edges = min(data.train.nnz, limit * cfg.train.batch_size) if limit > 0 else data.train.nnz  # per epoch
    mean_train = sum(e["train_seconds"] for e in epochs) / len(epochs)
    mean_eval = sum(e["eval_seconds"] for e in evaluated) / len(evaluated)
    result = {
        "model": args.model, "machine": machine, "command": " ".join(sys.argv), "epochs_run": len(epochs),
        "train_edges": data.train.nnz, "test_users": last["users"],
        "mean_train_seconds": mean_train, "mean_eval_seconds": mean_eval, "epoch_seconds": mean_train + mean_eval,
        # Edges actually trained per second (a capped epoch, train.limit_train_batches, trains
        # fewer); seconds per FULL epoch extrapolate from it. Unknown for popularity (no training).
        "edges_per_second": edges / mean_train if not trainer.model.closed_form else float("nan"),
        "full_epoch_seconds": data.train.nnz * mean_train / edges if not trainer.model.closed_form else float("nan"),
        "last_epoch": last["epoch"], "test_recall@20": last["recall"], "test_ndcg@20": last["ndcg"],
        "test_coverage@20": last["coverage"], "load_at_end": load_average(), "epochs": epochs,
    }
    name, a_recall, a_ndcg = ANCHORS[args.model]
    print(f"== {args.model}: {len(epochs)} epochs of {args.epochs}")
    print(f"   seconds/epoch {result['epoch_seconds']:.1f} = train {mean_train:.1f}"
          f" ({result['edges_per_second']:,.0f} edges/s) + full-ranking eval of {last['users']:,} users {mean_eval:.1f}")
    if edges < data.train.nnz:
        print(f"   capped epochs ({edges:,} of {data.train.nnz:,} edges): a full training epoch at this pace"
              f" = {result['full_epoch_seconds']:.1f}s")
    print(f"   test after epoch {last['epoch']}: recall@20 {last['recall']:.4f}  ndcg@20 {last['ndcg']:.4f}"
          f"  coverage@20 {last['coverage']:.4f}")
    if a_recall == a_recall:  # popularity has no anchor (NaN)
        print(f"   anchor {name}: recall@20 {a_recall:.4f}  ndcg@20 {a_ndcg:.4f}"
              f" (this run: {len(epochs)} epochs, recall@20 = {last['recall'] / a_recall:.0%} of it)")
    print(f"   load average at end: {result['load_at_end']}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    run(parse_args())
