"""An independent SASRec+ on the gSASRec ML-1M files: does the 512-user test figure come from
rayrec, or from the files?

Written from the papers' descriptions, not from rayrec's code: it reads the files itself, builds
its own batches, and uses the original SASRec block (Kang & McAuley 2018 as in its PyTorch port:
item embeddings scaled by sqrt(d) plus learned absolute positions on left-padded rows,
layer-normed queries, residual attention, a point-wise feed-forward with its own residual, a
last layer norm) with SASRec+'s loss and recipe (Klenitskiy & Vasilev 2023: full-softmax
cross-entropy at every position, d=64, 2 blocks, 1 head, dropout 0.1, Adam lr 1e-3, batch 128,
the last 200 items, patience 10 on validation NDCG@10, at most 100 epochs).

Protocol, as rayrec's: train on train_input.txt (val_input.txt's row for the 512); validation = the 512 users of val_input.txt,
target val_output.txt; test = test_output.txt from train (+ the validation input's extra item and
the validation target, for the 512), full ranking over all items, items in the input masked.
Reported: test NDCG@10 / HR@10 on the 512 complete-input users and on all 6,040.

    .venv/bin/python bench/sasrec_reference.py [--device cuda] [--epochs 100] [--seed 42]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

DATA = Path(os.environ.get("RAYREC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def read_rows(path: Path) -> list[list[int]]:
    return [[int(x) for x in line.split()] for line in path.read_text().splitlines()]


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d, eps=1e-8)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.Dropout(dropout), nn.ReLU(), nn.Linear(d, d), nn.Dropout(dropout))

    def forward(self, x, causal, keep):
        q = self.attn_norm(x)
        out, _ = self.attn(q, x, x, attn_mask=causal, need_weights=False)
        x = q + out
        x = self.ffn_norm(x)
        x = x + self.ffn(x)
        return x * keep


class SASRec(nn.Module):
    def __init__(self, n_items: int, max_len: int, d: int, blocks: int, heads: int, dropout: float):
        super().__init__()
        self.item = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos = nn.Embedding(max_len, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(d, eps=1e-8)
        self.d = d
        for param in self.parameters():  # the PyTorch port's initialisation: Xavier-normal matrices
            if param.dim() > 1:
                nn.init.xavier_normal_(param)
        with torch.no_grad():
            self.item.weight[0] = 0

    def forward(self, seq):  # (B, L) left-padded -> (B, L, d)
        L = seq.shape[1]
        keep = (seq != 0).unsqueeze(-1).to(self.item.weight.dtype)
        x = self.item(seq) * math.sqrt(self.d) + self.pos.weight[:L].unsqueeze(0)
        x = self.drop(x) * keep
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=seq.device), diagonal=1)
        for block in self.blocks:
            x = block(x, causal, keep)
        return self.norm(x)


def left_pad(rows: list[list[int]], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[-length:]
        if r:
            out[i, length - len(r):] = r
    return out


@torch.no_grad()
def evaluate(model, inputs: list[list[int]], targets: list[int], max_len: int, device, k: int = 10):
    """Per-user NDCG@k and HR@k, full ranking, the input's items masked."""
    model.eval()
    ndcg, hit = [], []
    for s in range(0, len(inputs), 512):
        rows = inputs[s:s + 512]
        seq = torch.as_tensor(left_pad(rows, max_len), device=device)
        scores = model(seq)[:, -1] @ model.item.weight.T
        scores[:, 0] = -torch.inf
        for i, r in enumerate(rows):
            scores[i, torch.as_tensor(r, device=device)] = -torch.inf
        target = torch.as_tensor(targets[s:s + 512], device=device)
        rank = (scores > scores.gather(1, target[:, None])).sum(1)
        ndcg.append(torch.where(rank < k, 1.0 / torch.log2(rank.float() + 2), 0.0).cpu())
        hit.append((rank < k).float().cpu())
    model.train()
    return torch.cat(ndcg).numpy(), torch.cat(hit).numpy()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DATA / "ml-1m-gsasrec"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="", help="write the result as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    d = Path(args.data)
    train = read_rows(d / "train_input.txt")
    val_in, val_out = read_rows(d / "val_input.txt"), [r[0] for r in read_rows(d / "val_output.txt")]
    test_out = [r[0] for r in read_rows(d / "test_output.txt")]
    n_items = max(max(max(r) for r in train if r), max(max(r) for r in val_in), max(val_out), max(test_out))
    # The 512 validation users: their val input is their train row plus one item. As in
    # SASRec+, training holds every user's sequence without its last two items: the val input.
    index = {tuple(r): u for u, r in enumerate(train)}
    val_users = [index[tuple(r[:-1])] for r in val_in]
    for u, r in zip(val_users, val_in):
        train[u] = list(r)
    test_in = [list(r) for r in train]
    for u, t in zip(val_users, val_out):
        test_in[u] = train[u] + [t]
    complete = np.zeros(len(train), dtype=bool)
    complete[val_users] = True

    device = torch.device(args.device)
    model = SASRec(n_items, args.max_len, args.hidden, 2, 1, args.dropout).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rows = [r for r in train if len(r) >= 2]
    train_arr = left_pad(rows, args.max_len + 1)
    best, best_epoch, best_state, curve, seconds = -1.0, 0, None, [], []
    print(f"{len(rows)} training rows, {n_items} items, device {device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}", flush=True)
    for epoch in range(1, args.epochs + 1):
        t = time.perf_counter()
        order = rng.permutation(len(rows))
        for s in range(0, len(order), 128):
            batch = torch.as_tensor(train_arr[order[s:s + 128]], device=device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            logits = model(inputs) @ model.item.weight.T
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
        v = float(evaluate(model, val_in, val_out, args.max_len, device)[0].mean())
        curve.append(round(v, 4))
        print(f"epoch {epoch:3d}  loss {loss.item():.3f}  val NDCG@10 {v:.4f}  {seconds[-1]:.1f} s", flush=True)
        if v > best:
            best, best_epoch = v, epoch
            best_state = {k: x.detach().clone() for k, x in model.state_dict().items()}
        elif epoch - best_epoch >= args.patience:
            break
    model.load_state_dict(best_state)
    ndcg, hit = evaluate(model, test_in, test_out, args.max_len, device)
    result = {
        "best_epoch": best_epoch, "epochs": len(curve), "best_val_ndcg10": round(best, 4),
        "test_complete_ndcg10": round(float(ndcg[complete].mean()), 4), "test_complete_hr10": round(float(hit[complete].mean()), 4),
        "test_complete_se": round(float(ndcg[complete].std(ddof=1) / math.sqrt(complete.sum())), 4),
        "test_all_ndcg10": round(float(ndcg.mean()), 4), "test_all_hr10": round(float(hit.mean()), 4),
        "median_epoch_s": round(float(np.median(seconds)), 2), "curve": curve, "seed": args.seed, "device": str(device),
    }
    print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
