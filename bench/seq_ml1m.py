"""Sequential models on ML-1M (the gSASRec copy in ../shared/data/ml-1m-gsasrec), on this machine.

    .venv/bin/python bench/seq_ml1m.py --model bert4rec --epochs 6 --max-minutes 10
    .venv/bin/python bench/seq_ml1m.py --model gru4rec --epochs 8 --max-minutes 10

Trains with the shared trainer (the one `rayrec train` and every sweep trial use) and
prints, per epoch: training seconds, training positions per second, validation seconds
and validation NDCG@10 / HR@10 with the load average; at the end, the best epoch's
validation metrics and test metrics evaluated once on the best weights, with the time of
that full-ranking evaluation over all 6,040 users. Figures only, never pass/fail.

Protocol: leave-one-out, full ranking over 3,416 items with the user's history masked
(anchors.md). Validation targets exist for the 512 users the gSASRec files keep them for;
test targets for all 6,040 (../shared/data/README.md). The model's recipe applies (README, Recipes:
constant lr after a one-epoch warm-up, early stopping with the model's patience); `--epochs`
is only the cap; `--max-minutes` is a time box: no epoch starts that would (at the last epoch's pace) end
past it, and a cut run is tested on its best weights so far.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import load_average, print_machine  # noqa: E402

# Architecture per model: anchors.md (SASRec+: d=64, 2 blocks, 1 head, max length 200;
# BERT4Rec: 2 layers, 2 heads, mask probability 0.2). GRU4Rec: one 64-unit layer, CE loss.
MODEL_SETTINGS = {
    "sasrec": {"model.hidden": 64, "model.blocks": 2, "model.heads": 1, "model.max_len": 200, "model.loss": "ce"},
    "bert4rec": {"model.hidden": 64, "model.blocks": 2, "model.heads": 2, "model.max_len": 200, "model.mask_prob": 0.2},
    "gru4rec": {"model.embedding": 64, "model.hidden": 64, "model.layers": 1, "model.max_len": 200,
                "model.dropout": 0.2, "model.loss": "ce"},
    "pop": {},  # the floor: training-set popularity, evaluated under the same protocol
}
ANCHORS = {  # anchors.md, ML-1M, full ranking: (NDCG@10, HR@10)
    "sasrec": ("SASRec+ (CE)", 0.1821, 0.3152),
    "bert4rec": ("BERT4Rec", 0.1537, 0.2843),
    "gru4rec": ("none published (report beside SASRec)", None, None),
    "pop": ("none (the baseline every model must beat)", None, None),
}


def parse_args(argv=None, model: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if model is None:
        p.add_argument("--model", choices=sorted(MODEL_SETTINGS), required=True)
    p.add_argument("--epochs", type=int, default=200, help="epoch cap (default 200); early stopping usually ends sooner")
    p.add_argument("--max-minutes", type=float, default=15.0,
                   help="time box: no new epoch starts that would end past it (default 15)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config override key=value")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if model is not None:
        args.model = model
    return args


def training_positions(data, model: str, max_len: int) -> int:
    """Positions one epoch trains on: next-item targets (SASRec, GRU4Rec: the last max_len + 1
    items give max_len targets) or input positions of the cloze model (BERT4Rec: max_len)."""
    import numpy as np

    lengths = data.train.lengths()
    lengths = lengths[lengths >= 2]
    if model == "bert4rec":
        return int(np.minimum(lengths, max_len).sum())
    return int((np.minimum(lengths, max_len + 1) - 1).sum())


def run(args: argparse.Namespace) -> dict:
    import torch

    from rayrec.config import build_config, parse_overrides
    from rayrec.data import load_split
    from rayrec.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    machine = print_machine(f"{args.model} on ml-1m-gsasrec")
    overrides = {
        "data.name": "ml-1m-gsasrec", **MODEL_SETTINGS[args.model],
        "train.batch_size": args.batch_size, "train.lr": args.lr, "train.epochs": args.epochs,
        "train.device": "cpu", "train.num_threads": args.threads,
        **parse_overrides(args.sets),
    }
    cfg = build_config(args.model, overrides=overrides)
    start = time.perf_counter()
    data = load_split(cfg.data)
    print(f"   {data.summary()}; loaded in {time.perf_counter() - start:.1f}s")
    print(f"   config: {json.dumps({k: v for k, v in cfg.flat().items() if k.startswith(('model.', 'train.'))})}")
    positions = float("nan")  # unknown for a capped epoch; none for popularity (no training)
    if not cfg.train.limit_train_batches and args.model != "pop":
        positions = training_positions(data, args.model, cfg.model.max_len)
    trainer = Trainer(cfg, data)
    deadline = time.perf_counter() + 60 * args.max_minutes
    epochs = []

    def on_epoch(tr, record) -> bool:
        val_seconds = record["epoch_seconds"] - record["train_seconds"]
        row = {
            "epoch": record["epoch"], "train_seconds": record["train_seconds"], "val_seconds": val_seconds,
            "epoch_seconds": record["epoch_seconds"], "positions_per_second": positions / record["train_seconds"],
            "loss": record["train_loss"], "lr": record["lr"], "val_ndcg@10": record["val_ndcg@10"],
            "val_hr@10": record["val_hr@10"], "val_coverage@10": record["val_coverage@10"], "load": load_average(),
        }
        epochs.append(row)
        print(f"   epoch {row['epoch']:>3}  train {row['train_seconds']:6.1f}s ({row['positions_per_second']:,.0f} pos/s)"
              f"  val {val_seconds:5.1f}s  loss {row['loss']:.4f}  lr {row['lr']:.2e}"
              f"  val ndcg@10 {row['val_ndcg@10']:.4f} hr@10 {row['val_hr@10']:.4f}  load {row['load']}", flush=True)
        # Stop when another epoch like this one would overrun the time box.
        return time.perf_counter() + record["epoch_seconds"] > deadline

    fit = trainer.fit(on_epoch=on_epoch)
    if fit.stop_reason == "stopped" and trainer.best_state is not None:
        trainer.model.load_state_dict(trainer.best_state)  # the time box cut the run: test the best weights
    t = time.perf_counter()
    test = trainer.test()  # once, on the best weights; all 6,040 users
    test_seconds = time.perf_counter() - t
    # The 512 users whose test input is complete (the gSASRec files lose the second-to-last
    # item of the others): the figure to hold against the anchors.
    complete = trainer.evaluate("test", users=data.test_groups["complete"]) if "complete" in data.test_groups else {}
    n = len(epochs)
    mean = lambda key: sum(e[key] for e in epochs) / n  # noqa: E731
    result = {
        "model": args.model, "machine": machine, "command": " ".join(sys.argv), "epochs_run": n,
        "epochs_scheduled": args.epochs, "stop_reason": fit.stop_reason, "best_epoch": fit.best_epoch,
        "train_positions_per_epoch": positions,
        "mean_train_seconds": mean("train_seconds"), "mean_val_seconds": mean("val_seconds"),
        "mean_epoch_seconds": mean("epoch_seconds"), "mean_positions_per_second": mean("positions_per_second"),
        "val_users": int(fit.best_metrics.get("val_n_users", 0)),
        "best_val_ndcg@10": fit.best_metrics["val_ndcg@10"], "best_val_hr@10": fit.best_metrics["val_hr@10"],
        "test_users": int(test["n_users"]), "test_seconds": test_seconds,
        "test_ndcg@10": test["ndcg@10"], "test_hr@10": test["hr@10"], "test_coverage@10": test["coverage@10"],
        "test_complete_users": int(complete.get("n_users", 0)),
        "test_complete_ndcg@10": complete.get("ndcg@10"), "test_complete_hr@10": complete.get("hr@10"),
        "load_at_end": load_average(), "epochs": epochs,
    }
    name, a_ndcg, a_hr = ANCHORS[args.model]
    print(f"== {args.model}: {n} epochs ({fit.stop_reason}, schedule {args.epochs}), best epoch {fit.best_epoch}")
    print(f"   seconds/epoch {result['mean_epoch_seconds']:.1f} (train {result['mean_train_seconds']:.1f}"
          f" + validation {result['mean_val_seconds']:.1f} for {result['val_users']} users);"
          f" {result['mean_positions_per_second']:,.0f} training positions/s ({positions:,.0f} per epoch)")
    print(f"   full-ranking evaluation of all {result['test_users']:,} users: {test_seconds:.1f}s")
    print(f"   valid (best epoch): ndcg@10 {result['best_val_ndcg@10']:.4f}  hr@10 {result['best_val_hr@10']:.4f}")
    print(f"   test (once):        ndcg@10 {result['test_ndcg@10']:.4f}  hr@10 {result['test_hr@10']:.4f}"
          f"  coverage@10 {result['test_coverage@10']:.4f}")
    if complete:
        print(f"   test, the {result['test_complete_users']} users with complete input: ndcg@10"
              f" {complete['ndcg@10']:.4f}  hr@10 {complete['hr@10']:.4f}  (compare these with the anchor)")
    if a_ndcg is not None:
        print(f"   anchor {name}: ndcg@10 {a_ndcg:.4f}  hr@10 {a_hr:.4f} (converged; this run: {n} epochs, "
              f"test ndcg@10 = {result['test_ndcg@10'] / a_ndcg:.0%} of it)")
    else:
        print(f"   anchor: {name}")
    print(f"   load average at end: {result['load_at_end']}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


def main(argv=None, model: str | None = None) -> None:
    run(parse_args(argv, model))


if __name__ == "__main__":
    main()
