"""SASRec on ML-1M on this machine: seconds per epoch, training positions per second,
full-ranking evaluation time for all 6,040 users, validation/test NDCG@10 and HR@10.

    .venv/bin/python bench/sasrec_ml1m.py --epochs 12 --max-minutes 15

SASRec+ settings (anchors.md): full-softmax cross-entropy, d=64, 2 blocks, 1 head, maximum
length 200, dropout 0.2, batch 128, lr 1e-3, on ../shared/data/ml-1m-gsasrec with the
shared trainer's defaults otherwise (AdamW, weight decay 0.01, warm-up then cosine decay
over --epochs, clipping 5.0). See bench/seq_ml1m.py for what is printed and the protocol;
compare with SASRec+ 0.1821 NDCG@10 / 0.3152 HR@10 (converged, ~100+ epochs).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from seq_ml1m import main  # noqa: E402

if __name__ == "__main__":
    main(model="sasrec")
