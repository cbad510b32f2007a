"""Where the minutes of `dvc repro` go, and what the run costs on a CPU without bf16.

Runs ``dvc repro`` (``--force``: every stage; without it only what is out of date) and stamps each line of
its output with the wall clock, or reads such stamped logs (``--log``: lines ``HH:MM:SS text``, as this
script writes them to ``OUT/repro.log``; a later log's stages replace an earlier one's, e.g. a stage rerun
alone with ``dvc repro --force -s STAGE`` after its code got faster). Minutes per stage come from the ``Running stage '...'`` lines;
tokens seen and tokens/s of each model from ``metrics/train_<model>.json``. The projection for a slower
CPU divides the tokens seen by ``--slow-tokens-per-s`` (default: the rate ``bench/cpu_bf16.py`` measures for the
trainer on a CPU without bf16 hardware, fp32, 11.1 k tokens/s on 2 cores) and keeps every other
stage's minutes as measured here. Writes ``OUT/run_budget.{json,md}``.

    python bench/run_budget.py [--force] [--log repro.log [--log stage.log]] [--out reports/studies/run_budget]

Last line: RESULT run_budget ratio=<projected / target minutes> ours=<projected min> baseline=<target min> min
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d) (.*)")
STAGE = re.compile(r"Running stage '([^']+)'")


def stage_minutes(lines: list[str]) -> tuple[dict[str, float], float]:
    """Minutes per stage of a stamped ``dvc repro`` log (a stage runs until the next starts or the log
    ends) and the minutes of the whole log."""
    stamped, day = [], 0  # (seconds, stage starting on that line or None)
    for line in lines:
        m = STAMP.match(line)
        if not m:
            continue
        t = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3)) + day
        if stamped and t < stamped[-1][0]:  # past midnight
            day += 86400
            t += 86400
        stage = STAGE.match(m.group(4))
        stamped.append((t, stage.group(1) if stage else None))
    if not stamped:
        raise ValueError("no stamped lines (HH:MM:SS text) in the log")
    starts = [(name, t) for t, name in stamped if name]
    ends = [t for _, t in starts[1:]] + [stamped[-1][0]]
    stages = {name: round((end - t) / 60, 2) for (name, t), end in zip(starts, ends)}
    return stages, round((stamped[-1][0] - stamped[0][0]) / 60, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="dvc repro --force: every stage")
    ap.add_argument("--log", action="append", help="read these stamped logs instead of running dvc repro")
    ap.add_argument("--out", default="reports/studies/run_budget")
    ap.add_argument("--slow-tokens-per-s", type=float, default=11100.0)
    ap.add_argument("--install-min", type=float, default=2.5, help="minutes of `make install` on a fresh clone")
    ap.add_argument("--target-min", type=float, default=30.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.log:
        stages: dict[str, float] = {}
        for log in args.log:
            part, _ = stage_minutes(Path(log).read_text().splitlines())
            stages.update(part)
        total = round(sum(stages.values()), 2)
        command = "stamped `dvc repro` logs " + ", ".join(Path(x).name for x in args.log)
    else:
        proc = subprocess.Popen(["dvc", "repro", *(["--force"] if args.force else [])], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        lines = []
        with open(out / "repro.log", "w") as log:
            for raw in proc.stdout:
                line = f"{datetime.datetime.now():%H:%M:%S} {raw.rstrip()}"
                print(line, flush=True)
                log.write(line + "\n")
                lines.append(line)
        if proc.wait():
            sys.exit(f"dvc repro failed ({proc.returncode}); log: {out / 'repro.log'}")
        command = "dvc repro" + (" --force" if args.force else "")
        stages, total = stage_minutes(lines)
    train = {}
    for f in sorted((ROOT / "metrics").glob("train_*.json")):
        m = json.loads(f.read_text())
        train[m["model"]] = {"tokens_seen": m["tokens_seen"], "tokens_per_second": m["tokens_per_second"],
                             "train_seconds": m["train_seconds"]}
    train_min = sum(v for k, v in stages.items() if k.startswith("train_"))
    tokens = sum(t["tokens_seen"] for t in train.values())
    slow_train = tokens / args.slow_tokens_per_s / 60
    projected = round(args.install_min + total - train_min + slow_train, 1)
    from agreelens.tracking import git_commit

    result = {"stages_min": stages, "total_min": total, "train_min": round(train_min, 2), "models": train,
              "tokens_seen": tokens, "slow_tokens_per_s": args.slow_tokens_per_s, "install_min": args.install_min,
              "projected_min_without_bf16": projected, "target_min": args.target_min}
    (out / "run_budget.json").write_text(json.dumps(result, indent=2) + "\n")
    rates = ", ".join(f"{k} {v['tokens_seen'] / 1e6:.2f} M at {v['tokens_per_second']:,} tokens/s"
                      for k, v in train.items())
    md = [f"Made by `python {' '.join(sys.argv)}` ({command}) on {datetime.date.today().isoformat()} at commit "
          f"{git_commit()[:7]}.", "",
          f"`dvc repro` of the default profile on this 2-core machine: **{total:.1f} min** in all; training {train_min:.1f} "
          f"min ({rates}). A fresh clone adds `make install` (about {args.install_min:g} min).", "",
          "| stage | min |", "|---|---:|", *[f"| {k} | {v:.1f} |" for k, v in stages.items()], "",
          f"On a CPU without bf16 the trainer runs about {args.slow_tokens_per_s / 1000:.1f} k tokens/s "
          f"(fp32; `bench/cpu_bf16.py`): {tokens / 1e6:.2f} M tokens take "
          f"{slow_train:.1f} min, and `make run` from a fresh clone about **{projected:.1f} min** with the "
          f"other stages as measured here (target: {args.target_min:g} min)."]
    (out / "run_budget.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"RESULT run_budget ratio={projected / args.target_min:.2f} ours={projected} baseline={args.target_min:g} min")


if __name__ == "__main__":
    main()
