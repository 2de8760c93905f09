"""rayrec's ALS (PyTorch, exact batched solves) against the `implicit` package's, on ML-1M.

    PYTHONPATH=<dir with implicit> .venv/bin/python bench/als_implicit.py --iterations 15 --threads 1

Both factorise the same binary training matrix of `ml-1m-gsasrec` with the same factors,
regularisation, confidence and number of sweeps (implicit stores the confidence as
alpha * r, so its alpha is 1 + rayrec's model.alpha on binary data), and both are scored
by rayrec's evaluator: implicit's item factors are loaded into a rayrec ALS model, which
folds each user in from the history (validation: train; test: train + validation), as
implicit's recalculate_user does. Prints fit seconds and validation / test NDCG@10 and
HR@10 for rayrec and implicit, each with its default conjugate-gradient solver (3 CG steps
per solve, warm-started) and with exact solves. Figures only, never pass/fail; `implicit`
is not a rayrec dependency: install it anywhere on PYTHONPATH to run this.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import load_average, print_machine  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=15, help="ALS sweeps for every contender (default 15)")
    p.add_argument("--factors", type=int, default=64)
    p.add_argument("--reg", type=float, default=0.01)
    p.add_argument("--alpha", type=float, default=10.0, help="rayrec's model.alpha (c = 1 + alpha)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from rayrec.config import build_config
    from rayrec.data import load_split
    from rayrec.data.batches import interaction_matrix
    from rayrec.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    print_machine("ALS: rayrec (PyTorch) vs implicit on ml-1m-gsasrec")
    def trainer_for(cg_steps: int) -> Trainer:
        cfg = build_config("als", overrides={
            "data.name": "ml-1m-gsasrec", "model.factors": args.factors, "model.reg": args.reg, "model.alpha": args.alpha,
            "model.cg_steps": cg_steps, "train.epochs": args.iterations, "train.device": "cpu",
            "train.num_threads": args.threads,
        })
        return Trainer(cfg, load_split(cfg.data))

    def figures(trainer: Trainer, name: str, seconds: float) -> dict:
        valid, test = trainer.evaluate("valid"), trainer.test_report()
        row = {"contender": name, "fit_seconds": round(seconds, 1), "val_ndcg@10": valid["ndcg@10"],
               "val_hr@10": valid["hr@10"], "test_ndcg@10": test["test"]["ndcg@10"], "test_hr@10": test["test"]["hr@10"],
               "test_complete_ndcg@10": test["test_complete"]["ndcg@10"], "test_complete_hr@10": test["test_complete"]["hr@10"],
               "load": load_average()}
        print(json.dumps(row), flush=True)
        return row

    rows = []
    for cg_steps, name in ((3, "rayrec als (torch, CG, 3 steps)"), (0, "rayrec als (torch, exact solves)")):
        trainer = trainer_for(cg_steps)
        if not rows:
            print(trainer.data.summary(), flush=True)
        start = time.perf_counter()
        for epoch in range(args.iterations):
            trainer.train_epoch(epoch)
        rows.append(figures(trainer, name, time.perf_counter() - start))

    from implicit.cpu.als import AlternatingLeastSquares

    user_items = interaction_matrix(trainer.data.train, trainer.data.n_items, dtype=np.float32)
    for use_cg, name in ((True, "implicit 0.7 (CG, 3 steps)"), (False, "implicit 0.7 (exact Cholesky)")):
        model = AlternatingLeastSquares(factors=args.factors, regularization=args.reg, alpha=1.0 + args.alpha,
                                        iterations=args.iterations, use_cg=use_cg, num_threads=args.threads,
                                        random_state=trainer.cfg.train.seed)
        start = time.perf_counter()
        model.fit(user_items, show_progress=False)
        seconds = time.perf_counter() - start
        with torch.no_grad():  # score implicit's item factors with rayrec's fold-in and evaluator
            trainer.model.item_factors[1:] = torch.from_numpy(np.asarray(model.item_factors))
        rows.append(figures(trainer, name, seconds))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return {"rows": rows}


if __name__ == "__main__":
    main()
