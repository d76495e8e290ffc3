"""Regenerate the shipped demo checkpoints: models/demo-base.pt (base) and models/demo.pt (base + LoRA).

    python tools/make_demo.py

Stage 1 pretrains a small byte-level LM on Python standard-library source; stage 2 adapts it with LoRA
to English prose (pydoc topics), which a code model predicts poorly: the adapted model's held-out prose
loss must come out clearly below the base's. The script prints the equivalent shell commands, runs them
in-process through the same click commands, and ends with a summary. It runs on one CPU thread so that
the result is reproducible on a given machine (and because that is fastest on a busy 2-core box).
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

import torch

from lora_export.cli import train_cli
from lora_export.model.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parent.parent
THREADS = 1
BASE = "models/demo-base.pt"
DEMO = "models/demo.pt"
PRETRAIN = [
    "pretrain", "-o", BASE, "--force",
    "--dim", "128", "--depth", "4", "--heads", "4", "--dim-head", "32", "--local-heads", "2", "--window", "64",
    "--global-attn", "softmax", "--max-seq-len", "256", "--dropout", "0",
    "--steps", "2500", "--batch-size", "16", "--lr", "3e-3", "--eval-every", "250", "--seed", "0",
]
ADAPT = [
    "adapt", BASE, "-o", DEMO, "--force",
    "--r", "8", "--alpha", "16", "--targets", "q,k,v,o,ff",
    "--steps", "400", "--batch-size", "16", "--lr", "3e-3", "--eval-every", "100", "--seed", "0",
]


def main() -> None:
    os.chdir(ROOT)
    (ROOT / "models").mkdir(exist_ok=True)
    torch.set_num_threads(THREADS)
    print("equivalent commands, from the repository root:")
    for args in (PRETRAIN, ADAPT):
        print(f"  OMP_NUM_THREADS={THREADS} lora-train {shlex.join(args)}")
    start = time.time()
    for args in (PRETRAIN, ADAPT):
        print(f"\n$ lora-train {shlex.join(args)}", flush=True)
        stage_start = time.time()
        train_cli.main(args, standalone_mode=False)
        print(f"{args[0]}: {time.time() - stage_start:.0f} s", flush=True)

    training = read_checkpoint(DEMO)["training"]
    print(f"\ntotal wall time {time.time() - start:.0f} s")
    for path in (BASE, DEMO):
        print(f"{path}: {Path(path).stat().st_size / 1e6:.2f} MB")
    print(f"parameters: {training['parameters']}")
    print(f"held-out prose loss: base {training['base_eval_loss']:.4f} -> adapted {training['adapted_eval_loss']:.4f}")


if __name__ == "__main__":
    main()
