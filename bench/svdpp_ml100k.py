"""SVD++ on ml-100k under the published rating protocol: 5-fold random split of all 100,000
ratings, RMSE and MAE on each test fold, mean over folds, beside the global-mean and
per-user-mean baselines on the same folds.

    RAYREC_DATA_MIRROR=file://$PWD/../shared/data/ml-100k PYTHONPATH=. \\
        .venv/bin/python bench/svdpp_ml100k.py --threads 1

Each fold is `rayrec train MODEL --data ml-100k --set data.fold=F` with the models'
defaults: fold F is test (20%), 10% of all ratings from the other folds is validation
(early stopping on validation RMSE) and the rest (70%) trains. With --refit, SVD++ is then
trained again on train + validation (80%, the published protocol's training share) for the
best epoch count the validation run found, and tested on the same fold (as `rayrec final
--train-on-valid` does). Figures only, never pass/fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import load_average, print_machine  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--refit", action="store_true", help="also retrain SVD++ on train + validation for its best epochs")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra SVD++ config, key=value")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    import numpy as np
    import yaml

    from rayrec.config import build_config
    from rayrec.data import load_split
    from rayrec.data.types import CSR
    from rayrec.train.trainer import Trainer

    print_machine("SVD++ on ml-100k, 5-fold random split")
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.sets)}
    rows: dict[str, list[dict]] = {}

    def record(name: str, fold: int, metrics: dict, **more) -> None:
        row = {"fold": fold, "rmse": metrics["rmse"], "mae": metrics["mae"], **more}
        rows.setdefault(name, []).append(row)
        print(f"fold {fold} {name:<16} test rmse {row['rmse']:.4f}  mae {row['mae']:.4f}  "
              + "  ".join(f"{k} {v}" for k, v in more.items()) + f"  (load {load_average()})", flush=True)

    for fold in args.folds:
        common = {"data.name": "ml-100k", "data.fold": fold, "train.device": "cpu", "train.num_threads": args.threads}
        for by in ("global", "user"):
            cfg = build_config("mean", overrides={**common, "model.by": by})
            trainer = Trainer(cfg, load_split(cfg.data))
            trainer.fit()
            record(f"mean ({by})", fold, trainer.test())
        cfg = build_config("svdpp", overrides={**common, **extra})
        data = load_split(cfg.data)
        start = time.perf_counter()
        trainer = Trainer(cfg, data)
        fit = trainer.fit()
        seconds = time.perf_counter() - start
        record("svdpp", fold, trainer.test(), best_epoch=fit.best_epoch, epochs=fit.epochs_run,
               val_rmse=round(fit.best_metrics["val_rmse"], 4), seconds=round(seconds, 1),
               s_per_epoch=round(seconds / fit.epochs_run, 2))
        if args.refit:
            # Train on train + validation (80%) for the selected number of epochs; no selection.
            empty = CSR(np.zeros(data.n_users + 1, dtype=np.int64), np.zeros(0, dtype=np.int64),
                        np.zeros(0, dtype=np.float32))
            merged = dataclasses.replace(data, train=data.train.concat(data.valid), valid=empty)
            refit_cfg = build_config("svdpp", overrides={**common, **extra, "train.epochs": fit.best_epoch})
            refit = Trainer(refit_cfg, merged)
            refit.fit()
            record("svdpp (refit)", fold, refit.test(), epochs=fit.best_epoch)

    summary = {name: {"rmse": float(np.mean([r["rmse"] for r in rs])), "mae": float(np.mean([r["mae"] for r in rs])),
                      "folds": len(rs)} for name, rs in rows.items()}
    print("== mean over folds")
    for name, s in summary.items():
        print(f"{name:<16} rmse {s['rmse']:.4f}  mae {s['mae']:.4f}  ({s['folds']} folds)")
    print(f"load average at end: {load_average()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "summary": summary}, fh, indent=1)
    return summary


if __name__ == "__main__":
    main()
