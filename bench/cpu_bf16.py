"""Training speed on an AVX-512 CPU without bf16 hardware: the trainer's precision choice vs bf16 autocast.

oneDNN "supports" bf16 on every AVX-512 CPU by emulating it, and ``torch.ops.mkldnn._is_mkldnn_bf16_supported``
says so; emulated bf16 is far slower than fp32. The trainer (``agreelens.train.autocast_dtype``) turns bf16
on only where the CPU has AVX512-BF16 or AMX. This script makes any AVX-512 machine look like one without
bf16 hardware (``ONEDNN_MAX_CPU_ISA=AVX512_CORE`` for oneDNN; the CPU-feature checks report no bf16) and
trains the default large model for ``--steps`` updates twice, in fresh processes:

- ours: the precision the trainer picks on such a CPU (fp32);
- baseline: bf16 autocast wherever oneDNN reports bf16 support (emulated here).

Usage: python bench/cpu_bf16.py [--steps 200] [--out reports/studies/cpu_bf16.md]   (needs the pipeline's syntax/train_large.txt and prepared/)
Last line: RESULT cpu_bf16 ratio=<ours/baseline> ours=<tokens/s> baseline=<tokens/s> tokens/s
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
from pathlib import Path
import torch
import agreelens.train as T
from agreelens.config import load_params

arm, steps, work = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
torch.cpu._is_avx512_bf16_supported = lambda: False  # a CPU without bf16 hardware
torch.cpu._is_amx_tile_supported = lambda: False
if arm == "baseline":  # bf16 wherever oneDNN reports support
    T.native_cpu_bf16 = lambda: bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
p = load_params("params.yaml")
p = p.model_copy(update={"train": p.train.model_copy(update={
    "max_steps": steps, "na_stimuli": "", "na_natural": "", "checkpoint_every": 10 ** 9})})
text = Path(p.syntax.out if p.syntax.enabled else p.augment.out) / "train_large.txt"
s = T.train(p, "large", T.Paths.scratch(p, text, work), quiet=True)
print(json.dumps({"tokens_per_second": s["tokens_per_second"],
                  "bf16": T.autocast_dtype(torch.device("cpu")) is not None}))
"""


def run(arm: str, steps: int) -> dict:
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MLFLOW_TRACKING_URI": "sqlite:///"
           + str(Path(tempfile.gettempdir()) / "agreelens-bench-mlflow.db")}
    with tempfile.TemporaryDirectory() as work:
        out = subprocess.run([sys.executable, "-c", CHILD, arm, str(steps), work], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{arm} run failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="", help="also write the result here (markdown)")
    args = ap.parse_args()
    ours, base = run("ours", args.steps), run("baseline", args.steps)
    lines = [f"ours: bf16 {ours['bf16']}, {ours['tokens_per_second']} tokens/s; "
             f"baseline: bf16 {base['bf16']}, {base['tokens_per_second']} tokens/s ({args.steps} updates each)",
             f"RESULT cpu_bf16 ratio={ours['tokens_per_second'] / base['tokens_per_second']:.2f} "
             f"ours={ours['tokens_per_second']} baseline={base['tokens_per_second']} tokens/s"]
    print("\n".join(lines))
    if args.out:
        import datetime

        sys.path.insert(0, str(ROOT))
        from agreelens.tracking import git_commit

        head = (f"Made by `python {' '.join(sys.argv)}` on {datetime.date.today().isoformat()} at commit "
                f"{git_commit()[:7]}, {os.cpu_count()} cores.\n\nThe default large model's trainer on a CPU "
                "made to look like one with AVX-512 but no bf16 hardware (`ONEDNN_MAX_CPU_ISA=AVX512_CORE`): "
                "the precision the trainer picks there (ours) against bf16 autocast wherever oneDNN reports "
                "support (baseline, emulated bf16).\n\n")
        Path(args.out).write_text(head + "\n\n".join(f"`{x}`" for x in lines) + "\n")


if __name__ == "__main__":
    main()
