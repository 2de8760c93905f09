"""The trainer's speed, each figure beside a plain-PyTorch reference measured in the same run.

    .venv/bin/python bench/speed.py                       # every case, one epoch each (about 15 min here)
    .venv/bin/python bench/speed.py --only sasrec,lightgcn --steps 20

For each case, in one process: seconds per training epoch and training positions (next-item
targets, BERT4Rec input positions, or graph edges) per second, seconds to rank every item
for every test user (full ranking, history masked, top-K), and peak memory (resident set
high-water mark of each phase). Beside each: a plain PyTorch implementation of the SAME
model (same sizes, dropout, loss and optimiser) written the way most code does it:

- transformers: `nn.TransformerEncoder` (pre-norm) with a materialised causal mask and a
  key-padding mask, `nn.Dropout`, `F.cross_entropy` over the full (positions x items)
  logits; batches of shuffled users padded to the longest row of the batch (no length
  bucketing); scoring runs every position through every block;
- GRU4Rec: `nn.GRU` on the same plain batches, `nn.Dropout`, `F.cross_entropy`;
- LightGCN: propagation with a COO `torch.sparse.mm` and autograd's own backward;
  BPR-MF: `nn.Embedding` look-ups; both with `torch.optim.Adam` and the same pair batches;
- scoring: the same batch sizes, users in dataset order, `scatter_` of -inf over the
  history and one `topk`.

Both sides see every training row (or edge) once per epoch. With `--steps N` each side runs
its first N batches and the epoch figures are scaled to a whole epoch from those (say so
when you quote them). Figures only, never pass/fail; the machine and load average are
printed beside them. Data: ../shared/data (ml-1m-gsasrec, beauty, gowalla).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import load_average, print_machine  # noqa: E402

SEQ_ML1M = {"data.name": "ml-1m-gsasrec", "model.hidden": 64, "model.max_len": 200, "train.batch_size": 128}
GRAPH = {"data.name": "gowalla", "data.split": "ratio", "data.valid_ratio": 0.0, "model.hidden": 64,
         "train.batch_size": 2048, "train.eval_batch_size": 4096, "train.ks": [20], "train.metric": "recall@20"}


@dataclass
class Case:
    name: str
    model: str
    overrides: dict = field(default_factory=dict)


CASES = [
    Case("sasrec", "sasrec", {**SEQ_ML1M, "model.blocks": 2, "model.heads": 1, "model.loss": "ce"}),
    Case("bert4rec", "bert4rec", {**SEQ_ML1M, "model.blocks": 2, "model.heads": 2}),
    Case("gru4rec", "gru4rec", {**SEQ_ML1M, "model.embedding": 64, "model.layers": 1, "model.loss": "ce"}),
    Case("sasrec-beauty", "sasrec", {"data.name": "beauty", "model.max_len": 50, "train.batch_size": 128}),
    Case("lightgcn", "lightgcn", {**GRAPH, "model.layers": 3}),
    Case("bprmf", "bprmf", dict(GRAPH)),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma-separated cases (default all: {', '.join(c.name for c in CASES)})")
    p.add_argument("--steps", type=int, default=0, help="time only the first N batches of each side (0 = whole epoch)")
    p.add_argument("--no-reference", action="store_true", help="skip the plain-PyTorch references")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="rayrec's side: cpu or cuda (the references run on CPU only)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra override for rayrec's side")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p.parse_args(argv)


# --- memory --------------------------------------------------------------------------------


def reset_peak_memory() -> None:
    """Reset the resident-set high-water mark (Linux: writing 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- plain references ------------------------------------------------------------------------


def plain_sequence_model(name: str, cfg, data):
    """nn.TransformerEncoder / nn.GRU versions of rayrec's sequential models (same sizes)."""
    import torch
    from torch import nn

    m = cfg.model

    class PlainTransformer(nn.Module):
        def __init__(self, n_tokens: int, causal: bool):
            super().__init__()
            self.causal = causal
            self.item_emb = nn.Embedding(n_tokens, m.hidden, padding_idx=0)
            self.pos_emb = nn.Embedding(m.max_len, m.hidden)
            self.drop = nn.Dropout(m.dropout)
            layer = nn.TransformerEncoderLayer(m.hidden, m.heads, m.ffn_mult * m.hidden, m.dropout, activation="gelu",
                                               batch_first=True, norm_first=True)
            layer.self_attn.dropout = m.attn_dropout  # rayrec's attention-weight dropout (may differ from m.dropout)
            self.encoder = nn.TransformerEncoder(layer, m.blocks, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(m.hidden)

        def forward(self, seq):  # (B, L) right-padded -> (B, L, C)
            B, L = seq.shape
            pad = seq == 0
            recency = ((~pad).sum(1, keepdim=True) - 1 - torch.arange(L)).clamp(min=0)
            x = self.drop(self.item_emb(seq) + self.pos_emb(recency))
            mask = torch.triu(torch.full((L, L), float("-inf")), diagonal=1) if self.causal else None
            x = self.encoder(x, mask=mask, src_key_padding_mask=torch.zeros_like(pad, dtype=torch.float).masked_fill(pad, float("-inf")))
            return self.norm(x)

    class PlainGRU(nn.Module):
        def __init__(self):
            super().__init__()
            self.item_emb = nn.Embedding(data.n_items + 1, m.embedding, padding_idx=0)
            self.drop = nn.Dropout(m.dropout)
            self.gru = nn.GRU(m.embedding, m.hidden, num_layers=m.layers, batch_first=True)

        def forward(self, seq):
            return self.drop(self.gru(self.drop(self.item_emb(seq)))[0])

    if name == "gru4rec":
        return PlainGRU()
    if name == "bert4rec":
        return PlainTransformer(data.n_items + 2, causal=False)
    return PlainTransformer(data.n_items + 1, causal=True)


def plain_sequence_loss(name: str, model, seq, ours):
    import torch
    from torch.nn import functional as F

    table = model.item_emb.weight
    if name == "bert4rec":
        inputs, masked = ours.cloze(seq)  # the same masking rule; masking is not where time goes
        hidden, targets = model(inputs)[masked], seq[masked]
        table = table[: ours.n_items + 1]
    else:
        n = (seq != 0).sum(1)
        col = torch.arange(seq.shape[1] - 1)[None, :]
        inputs = torch.where(col < (n - 1)[:, None], seq[:, :-1], 0)
        targets = seq[:, 1:]
        keep = targets != 0
        hidden, targets = model(inputs)[keep], targets[keep]
    logits = hidden @ table.T
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets)


def plain_sequence_scores(name: str, model, seq, ours):
    """Scores from every position through every block, then the last real one."""
    import torch

    if name == "bert4rec":
        table = model.item_emb.weight[: ours.n_items + 1]
    else:
        table = model.item_emb.weight
    states = model(seq)
    last = (seq != 0).sum(1) - 1
    return states[torch.arange(len(seq)), last] @ table.T


class PlainGraph:
    """LightGCN (COO torch.sparse.mm, autograd backward) or BPR-MF with plain embeddings."""

    def __init__(self, cfg, data, layers: int):
        import numpy as np
        import torch

        self.layers, self.reg = layers, cfg.model.reg
        U, N = data.n_users, data.n_items
        self.n_users = U
        self.user = torch.nn.Parameter(torch.randn(U, cfg.model.hidden) * cfg.model.init_std)
        self.item = torch.nn.Parameter(torch.randn(N, cfg.model.hidden) * cfg.model.init_std)
        if layers:
            u, i = data.train.rows(), U + data.train.items - 1
            rows, cols = np.concatenate([u, i]), np.concatenate([i, u])
            deg = np.bincount(rows, minlength=U + N).astype(np.float32)
            vals = 1.0 / np.sqrt(deg[rows] * deg[cols])
            self.adj = torch.sparse_coo_tensor(np.stack([rows, cols]), vals, (U + N, U + N)).coalesce()

    def parameters(self):
        return [self.user, self.item]

    def final(self):
        import torch

        if not self.layers:
            return self.user, self.item
        ego = torch.cat([self.user, self.item])
        layer, total = ego, ego
        for _ in range(self.layers):
            layer = torch.sparse.mm(self.adj, layer)
            total = total + layer
        final = total / (self.layers + 1)
        return final[: self.n_users], final[self.n_users :]

    def loss(self, batch):
        from torch.nn import functional as F

        users, pos, neg = batch["users"], batch["pos"] - 1, batch["neg"][:, 0] - 1
        uf, itf = self.final()
        u = uf[users]
        bpr = F.softplus((u * itf[neg]).sum(-1) - (u * itf[pos]).sum(-1)).mean()
        l2 = 0.5 * (self.user[users].pow(2).sum() + self.item[pos].pow(2).sum() + self.item[neg].pow(2).sum())
        return bpr + self.reg * l2 / len(users)


# --- timing ------------------------------------------------------------------------------------


def positions(model_name: str, seq) -> int:
    real = (seq != 0).sum(1)
    if model_name == "bert4rec":
        return int(real.sum())
    return int((real - 1).clamp(min=0).sum())


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def warm_up(trainer, batches) -> None:
    """Two optimiser steps before the clock starts (thread pool, allocator), weights restored."""
    from rayrec.train.evaluate import batch_to_device

    state = trainer.state_dict()
    trainer.model.train()
    for batch in batches:
        trainer._step(batch_to_device(batch, trainer.device))
    trainer.load_state_dict(state)


def time_ours(case: Case, cfg, data, steps: int) -> dict:
    import numpy as np
    import torch

    from rayrec.train.evaluate import batch_to_device
    from rayrec.train.trainer import Trainer

    trainer = Trainer(cfg, data)
    rng = np.random.default_rng([cfg.train.seed, 0])
    t = time.perf_counter()
    all_batches = list(trainer.model.train_batches(data, cfg.train.batch_size, rng, bucket_batches=cfg.train.bucket_batches))
    build_seconds = time.perf_counter() - t  # paid once per epoch, capped or not
    batches = all_batches[:steps] if steps else all_batches
    def work(bs) -> int:
        if trainer.model.kind == "graph":
            return sum(len(b["users"]) for b in bs)
        return sum(positions(case.model, torch.as_tensor(b["seq"])) for b in bs)

    total, timed = work(all_batches), work(batches)
    warm_up(trainer, all_batches[-2:])
    reset_peak_memory()
    trainer.model.train()
    t = time.perf_counter()
    for batch in batches:  # the trainer's step, as train_epoch runs it (lr is constant here)
        trainer._step(batch_to_device(batch, trainer.device))
    synchronize(trainer.device)
    seconds = time.perf_counter() - t
    train_mem = peak_memory_mb()
    # Bucketed batches differ in size: a capped run scales by work done, not by batch count.
    epoch_seconds = build_seconds + seconds * total / timed
    trainer.evaluate("valid")  # as in a run, where every epoch validates before the one test evaluation
    reset_peak_memory()
    t = time.perf_counter()
    test = trainer.evaluate("test")
    eval_seconds = time.perf_counter() - t
    return {"train_seconds": seconds, "build_seconds": build_seconds, "epoch_seconds": epoch_seconds,
            "per_second": timed / seconds,
            "work_per_epoch": total, "batches": len(all_batches), "eval_seconds": eval_seconds, "eval_users": int(test["n_users"]),
            "train_peak_mb": train_mem, "eval_peak_mb": peak_memory_mb(), "trainer": trainer}


def time_reference(case: Case, cfg, data, steps: int, ours_trainer) -> dict:
    import numpy as np
    import torch

    from rayrec.data.batches import pair_batches, sequence_batches
    from rayrec.train.evaluate import history_mask_indices

    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng([cfg.train.seed, 0])
    graph = ours_trainer.model.kind == "graph"
    if graph:
        model = PlainGraph(cfg, data, cfg.model.layers if case.model == "lightgcn" else 0)
        params = model.parameters()
        batch_iter = pair_batches(data.train, data.n_items, cfg.train.batch_size, rng, 1)
    else:
        model = plain_sequence_model(case.model, cfg, data)
        params = list(model.parameters())
        length = cfg.model.max_len + (0 if case.model == "bert4rec" else 1)
        batch_iter = sequence_batches(data.train, length, cfg.train.batch_size, rng, bucket_batches=1)
    opt = torch.optim.Adam(params, lr=cfg.train.lr)
    reset_peak_memory()
    work, n, warm = 0, 0, 2  # the first two steps warm up, untimed, like rayrec's side
    t = time.perf_counter()
    for batch in batch_iter:
        if steps and n == steps:
            break
        if warm == 0 and n == 0 and work == 0:
            t = time.perf_counter()
        batch = {k: torch.as_tensor(v) for k, v in batch.items() if k != "weight"}
        opt.zero_grad()
        if graph:
            loss = model.loss(batch)
            work += len(batch["users"])
        else:
            model.train()
            loss = plain_sequence_loss(case.model, model, batch["seq"], ours_trainer.model)
            work += positions(case.model, batch["seq"])
        loss.backward()
        opt.step()
        if warm:  # not counted
            warm -= 1
            work = 0
            continue
        n += 1
    seconds = time.perf_counter() - t
    train_mem = peak_memory_mb()
    # Scoring: every test user, same batch size as rayrec's, dataset order, scatter + topk.
    users = data.eval_users("test")
    history = data.history("test")
    kmax = max(cfg.train.ks)
    reset_peak_memory()
    t = time.perf_counter()
    with torch.no_grad():
        if graph:
            uf, itf = model.final()
            table = torch.cat([itf.new_zeros(1, itf.shape[1]), itf])
        else:
            model.eval()
        for s in range(0, len(users), cfg.train.eval_batch_size):
            b = users[s : s + cfg.train.eval_batch_size]
            if graph:
                scores = uf[torch.as_tensor(b)] @ table.T
            else:
                seq = torch.as_tensor(ours_trainer.model.eval_inputs(history, b)["seq"])
                scores = plain_sequence_scores(case.model, model, seq, ours_trainer.model)
            scores.scatter_(1, history_mask_indices(history, b), float("-inf"))
            scores[:, 0] = float("-inf")
            scores.topk(kmax, dim=1)
    eval_seconds = time.perf_counter() - t
    return {"train_seconds": seconds, "per_second": work / seconds, "batches_timed": n,
            "eval_seconds": eval_seconds, "train_peak_mb": train_mem, "eval_peak_mb": peak_memory_mb()}


def run_case(case: Case, args) -> dict:
    import torch

    from rayrec.config import build_config, parse_overrides
    from rayrec.data import load_split

    overrides = {**case.overrides, "train.device": args.device, "train.num_threads": args.threads,
                 "train.limit_train_batches": args.steps, **parse_overrides(args.sets)}
    cfg = build_config(case.model, overrides=overrides)
    data = load_split(cfg.data)
    unit = "edges" if case.model in ("lightgcn", "bprmf") else "positions"
    print(f"-- {case.name}: {data.summary()}", flush=True)
    load_before = load_average()
    ours = time_ours(case, cfg, data, args.steps)
    row = {"case": case.name, "model": case.model, "dataset": cfg.data.name, "unit": unit,
           "config": {k: v for k, v in cfg.flat().items() if k.startswith(("model.", "train."))},
           "ours": {k: v for k, v in ours.items() if k != "trainer"}, "load_start": load_before}
    print(f"   rayrec    : {ours['epoch_seconds']:7.1f} s/epoch ({ours['per_second']:>9,.0f} {unit}/s over"
          f" {ours['train_seconds']:.1f} s; batches built in {ours['build_seconds']:.1f} s)  eval {ours['eval_seconds']:5.2f} s for {ours['eval_users']:,} users"
          f"  peak {ours['train_peak_mb']:,.0f} / {ours['eval_peak_mb']:,.0f} MB  load {load_average()}", flush=True)
    if not args.no_reference and args.device == "cpu":
        ref = time_reference(case, cfg, data, args.steps, ours["trainer"])
        ref["epoch_seconds"] = ours["work_per_epoch"] / ref["per_second"]
        row["reference"] = ref
        row["speedup_train"] = ours["per_second"] / ref["per_second"]
        row["speedup_eval"] = ref["eval_seconds"] / ours["eval_seconds"]
        print(f"   reference : {ref['epoch_seconds']:7.1f} s/epoch ({ref['per_second']:>9,.0f} {unit}/s over"
              f" {ref['train_seconds']:.1f} s)  eval {ref['eval_seconds']:5.2f} s"
              f"  peak {ref['train_peak_mb']:,.0f} / {ref['eval_peak_mb']:,.0f} MB  load {load_average()}")
        print(f"   rayrec / reference: training {row['speedup_train']:.2f}x, evaluation {row['speedup_eval']:.2f}x", flush=True)
    row["load_end"] = load_average()
    del ours["trainer"]
    torch.set_num_threads(args.threads)
    return row


def main(argv=None) -> list[dict]:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else [c.name for c in CASES]
    unknown = sorted(set(names) - {c.name for c in CASES})
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(unknown)}; valid: {', '.join(c.name for c in CASES)}")
    machine = print_machine("rayrec training and evaluation speed vs plain PyTorch")
    rows = [run_case(c, args) for c in CASES if c.name in names]
    print(f"== done; load average {load_average()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "command": " ".join(sys.argv), "cases": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
