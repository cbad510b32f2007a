"""Load test of the agreement-checker service (services/service.py) on loopback.

Starts ``bentoml serve services.service:AgreeLens`` on a free 127.0.0.1 port with the model named by
``--model`` (``small`` by default: ``AGREELENS_SERVICE_MODEL``; API key off; settings from params.yaml
``service:``: 1 worker, 1 torch thread, /check_batch batching up to 32 texts), waits for ``/readyz`` and
a first ``/check``, runs the phases below, and stops the service by the PID (process group) it started.
Every request goes to 127.0.0.1 only; every loop is bounded in count and in time (``--max-seconds``).

Texts are real sentences of the held-out test split (``prepared/test.txt``, detokenized: punctuation
attached, first letter capitalized), some with one agreement site swapped to its other form, at
various lengths: short (<= 8 words), medium (9-19), exactly 20 words, and long texts of 2-4 sentences.

Phases (after a warm-up, not measured: the /explain texts are picked, and a concurrent burst of
/check and /check_batch lets BentoML's batching dispatcher train its latency model, which it does on
its first ~20 requests sent one by one):

1. ``latency``: ``--seq-n`` /check requests of 20-word sentences sent one at a time (one connection,
   nothing else in flight): p50/p99. This is what the latency target is about (p50 <= 15 ms, p99 <= 50
   ms, small model, 2 cores).
2. ``compare`` (the RESULT line): the same ``--compare-n`` 20-word sentences at concurrency
   ``--concurrency`` (32), once as one text per ``/check`` request (baseline: each request its own LM
   forward) and once as one text per ``/check_batch`` request (ours: BentoML's adaptive batching merges
   concurrent requests into one forward of up to ``service.batch_max_size`` texts); req/s of each, best
   of ``--rounds`` alternating rounds. Same texts, same client, same concurrency, same answers: only the
   batching differs. Sending the /check requests one at a time would not be an honest baseline for a
   concurrent client: it measures the client's pipelining (no overlap of HTTP handling and compute), not
   anything the service does; its figures are in phase 1.
3. ``mixed``: ``--n`` requests (10 000) at concurrency 32, drawn with a fixed seed: ~80% /check (all
   lengths), ~7% /check_batch (2-8 texts), ~3% /explain (sentences whose /check found a site), ~3%
   /score (5 BLiMP pairs), ~7% bad input that must get a given 4xx (empty text, wrong type, not JSON,
   wrong Content-Type, text over 5000 characters, site out of range, empty pairs). Per endpoint p50/p99
   latency, overall req/s; ``errors`` = 5xx answers and transport errors (timeouts, refused or reset
   connections); an expected 4xx is not an error; any other status than the expected one is counted as
   ``unexpected``.

A 503 from /check_batch is BentoML's adaptive-batching load shedding: its dispatcher cancels a queued
request whose wait plus the estimated batch time reaches ``service.batch_max_latency_ms`` (1000 ms),
which the queueing of a concurrency-32 mixed load on one worker can reach; the other endpoints have no
such deadline and just queue. ``--service batch_max_latency_ms=5000`` (any ``service.KEY=VALUE``) serves
from a temporary project folder whose params.yaml differs in that key, to try a setting without editing
params.yaml. ``--seq-n 0`` / ``--compare-n 0`` skip phases 1 / 2 (no RESULT line without phase 2).

The CPU is shared (2 cores, other engineers' jobs): the 1-minute load average is printed before and
after each phase; run it under ``nice -n 10``. The client itself (httpx, asyncio) shares those cores.

Usage: nice -n 10 python bench/checker_load.py [--model small] [--n 10000] [--concurrency 32]
       [--service KEY=VALUE] [--json FILE] [--log FILE]
Last line: RESULT checker_load ratio=<batched/unbatched> ours=<x> baseline=<y> req/s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agreelens.tracking import git_commit  # noqa: E402  (light: no torch)

TARGET_P50_MS, TARGET_P99_MS, TARGET_RPS = 15.0, 50.0, 100.0
SWAP = {"is": "are", "are": "is", "was": "were", "were": "was", "has": "have", "have": "has",
        "does": "do", "do": "does", "likes": "like", "like": "likes", "wants": "want", "want": "wants",
        "knows": "know", "know": "knows", "lives": "live", "live": "lives", "makes": "make", "make": "makes"}


# ---------------------------------------------------------------------------------------- texts


def detok(tokens: list[str]) -> str:
    s = " ".join(tokens)
    s = re.sub(r" ([.,!?;:%)])", r"\1", s)
    s = re.sub(r"\( ", "(", s)
    s = re.sub(r" (n't|'s|'re|'ll|'ve|'d|'m)\b", r"\1", s)
    return s[:1].upper() + s[1:]


def n_words(tokens: list[str]) -> int:
    return sum(1 for t in tokens if any(c.isalnum() for c in t))


def swapped(tokens: list[str], rng: random.Random) -> list[str]:
    """One agreement-ish word after the first token swapped to its other form (where there is one)."""
    idx = [i for i, t in enumerate(tokens) if i and t in SWAP]
    if not idx:
        return tokens
    i = rng.choice(idx)
    return tokens[:i] + [SWAP[tokens[i]]] + tokens[i + 1:]


def load_texts(seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    lines = [ln.split() for ln in (ROOT / "prepared" / "test.txt").read_text(encoding="utf-8").splitlines()]
    lines = [t for t in lines if t and t[-1] in ".?!" and '"' not in t]
    pools: dict[str, list[str]] = {"short": [], "medium": [], "w20": []}
    for toks in lines:
        w = n_words(toks)
        if rng.random() < 0.3:
            toks = swapped(toks, rng)
        key = "short" if 3 <= w <= 8 else "medium" if 9 <= w <= 19 else "w20" if w == 20 else None
        if key:
            pools[key].append(detok(toks))
    mediums = pools["short"] + pools["medium"]
    pools["long"] = [" ".join(rng.sample(mediums, rng.randint(2, 4))) for _ in range(400)]
    for k, v in pools.items():
        if not v:
            raise SystemExit(f"no {k} sentences in prepared/test.txt (run `dvc repro prepare`)")
    return pools


def load_pairs(n: int, seed: int) -> list[dict]:
    recs = []
    for f in sorted((ROOT / "data" / "blimp").glob("*.jsonl")):
        with f.open(encoding="utf-8") as fh:
            recs += [json.loads(line) for _, line in zip(range(50), fh)]
    keep = ("sentence_good", "sentence_bad", "UID", "pairID")
    rng = random.Random(seed)
    return [{k: r[k] for k in keep} for r in rng.sample(recs, min(n, len(recs)))] if recs else []


# ---------------------------------------------------------------------------------------- requests


class Req:
    __slots__ = ("label", "path", "body", "ctype", "expect")

    def __init__(self, label: str, path: str, body, expect: int = 200, ctype: str = "application/json"):
        self.label, self.path, self.ctype, self.expect = label, path, ctype, expect
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()


def mixed_requests(n: int, pools: dict, explain_texts: list[str], pairs: list[dict], seed: int) -> list[Req]:
    rng = random.Random(seed)
    bad = [
        Req("bad", "/check", {"text": ""}, 400),
        Req("bad", "/check", {"text": 5}, 400),
        Req("bad", "/check", {"texts": ["x"]}, 400),
        Req("bad", "/check", b'{"text": "The boy likes', 400),
        Req("bad", "/check", b"The boy likes it.", 415, "text/plain"),
        Req("bad", "/check", {"text": "a " * 3000}, 413),
        Req("bad", "/check", {"text": "bell \u0007 here"}, 400),
        Req("bad", "/explain", {"text": "The boy likes the girl.", "site": 99}, 422),
        Req("bad", "/explain", {"text": "The boy likes the girl.", "site": -1}, 400),
        Req("bad", "/score", {"pairs": []}, 400),
        Req("bad", "/check_batch", {"texts": "not a list"}, 400),
    ]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.80:
            kind = rng.choices(["short", "medium", "w20", "long"], [3, 3, 3, 1])[0]
            text = rng.choice(pools[kind])
            out.append(Req("check_20w" if kind == "w20" else "check", "/check", {"text": text}))
        elif r < 0.87:
            texts = [rng.choice(pools[rng.choice(["short", "medium", "w20"])]) for _ in range(rng.randint(2, 8))]
            out.append(Req("check_batch", "/check_batch", {"texts": texts}))
        elif r < 0.90:
            out.append(Req("explain", "/explain", {"text": rng.choice(explain_texts)}))
        elif r < 0.93:
            out.append(Req("score", "/score", {"pairs": rng.sample(pairs, min(5, len(pairs)))}))
        else:
            out.append(rng.choice(bad))
    return out


async def run_requests(url: str, reqs: list[Req], concurrency: int, deadline: float, timeout: float = 60.0):
    """Send ``reqs`` with ``concurrency`` workers; returns (per request (label, seconds, status or None,
    expected), wall seconds). Stops taking new requests at ``deadline`` (monotonic)."""
    results: list[tuple[str, float, int | None, int]] = []
    queue: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def worker():
            while time.monotonic() < deadline:
                try:
                    r = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                try:
                    resp = await client.post(r.path, content=r.body, headers={"Content-Type": r.ctype})
                    await resp.aread()
                    status: int | None = resp.status_code
                except httpx.HTTPError:
                    status = None
                results.append((r.label, time.perf_counter() - t0, status, r.expect))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return results, wall


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def summarize(results, wall: float) -> dict:
    by: dict[str, list] = defaultdict(list)
    for label, sec, status, expect in results:
        by[label].append((sec, status, expect))
    rows = {}
    for label, items in sorted(by.items()):
        lat = [s * 1000 for s, _, _ in items]
        rows[label] = {"n": len(items), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "mean_ms": statistics.fmean(lat),
                       "errors": sum(1 for _, st, _ in items if st is None or st >= 500),
                       "unexpected": sum(1 for _, st, ex in items if st is not None and st < 500 and st != ex)}
    n = len(results)
    ok = sum(1 for _, _, st, ex in results if st == ex)  # shed (503) or failed requests are not throughput
    return {"n": n, "ok": ok, "wall_s": wall, "rps": ok / wall if wall else 0.0, "rows": rows,
            "errors": sum(r["errors"] for r in rows.values()), "unexpected": sum(r["unexpected"] for r in rows.values())}


def print_table(title: str, s: dict) -> None:
    print(f"\n{title}: {s['n']} requests in {s['wall_s']:.1f} s = {s['rps']:.1f} req/s, "
          f"errors {s['errors']}, unexpected status {s['unexpected']}")
    print(f"  {'endpoint':<12} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'errors':>7} {'unexp':>6}")
    for label, r in s["rows"].items():
        print(f"  {label:<12} {r['n']:>6} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['mean_ms']:>8.1f} "
              f"{r['errors']:>7} {r['unexpected']:>6}")


def loadavg() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


# ---------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overlay_project(tmp: Path, settings: list[str]) -> Path:
    """A project folder whose params.yaml is this one's with ``service.KEY=VALUE`` changed (YAML values)
    and whose other entries link to this project's (models, metrics, prepared, data)."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for item in settings:
        key, _, value = item.partition("=")
        if not key or not _:
            raise SystemExit(f"--service {item!r}: expected KEY=VALUE")
        params.setdefault("service", {})[key.removeprefix("service.")] = yaml.safe_load(value)
    proj = tmp / "project"
    proj.mkdir()
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    for entry in ROOT.iterdir():
        if entry.name != "params.yaml" and not entry.name.startswith("."):
            (proj / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return proj


def start_service(model: str, home: Path, log_path: Path, timeout: float = 300.0, project: Path | None = None):
    port = free_port()
    env = {**os.environ, "AGREELENS_SERVICE_MODEL": model, "BENTOML_HOME": str(home),
           "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "true", "OMP_NUM_THREADS": "1"}
    env.pop("AGREELENS_API_KEY", None)
    if project is not None:
        env["AGREELENS_PROJECT"] = str(project)
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "services.service:AgreeLens",
                                 "--host", "127.0.0.1", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"bentoml serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                r = httpx.post(url + "/check", json={"text": "The boy likes it."}, timeout=30)
                if r.status_code == 200:
                    return proc, url, time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout:
            stop_service(proc)
            raise SystemExit(f"service not ready after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_service(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group of the PID we started (bentoml and its worker), SIGKILL if needed."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", help="models/<name>, a model directory or models:/name@alias")
    ap.add_argument("--n", type=int, default=10_000, help="requests of the mixed phase")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seq-n", type=int, default=300, help="sequential 20-word /check requests (latency)")
    ap.add_argument("--compare-n", type=int, default=1000, help="requests per arm of the batching comparison")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the comparison (best kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=480.0, help="stop sending after this many seconds in all")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--log", type=Path, help="copy the service's log here")
    ap.add_argument("--service", action="append", default=[], metavar="KEY=VALUE",
                    help="serve with params.yaml service.KEY changed (a temporary project folder; repeatable)")
    args = ap.parse_args()
    t_start = time.monotonic()
    deadline = t_start + args.max_seconds

    pools = load_texts(args.seed)
    pairs = load_pairs(200, args.seed)
    print(f"texts: {', '.join(f'{k} {len(v)}' for k, v in pools.items())}; BLiMP pairs {len(pairs)}")
    print(f"cpu: {os.cpu_count()} cores, {loadavg()} (shared machine)")

    with tempfile.TemporaryDirectory(prefix="agreelens-load-") as tmp:
        log_path = Path(tmp) / "serve.log"
        project = overlay_project(Path(tmp), args.service) if args.service else None
        proc, url, startup = start_service(args.model, Path(tmp) / "bentoml", log_path, project=project)
        print(f"service pid {proc.pid} on {url}, model {args.model}, ready in {startup:.1f} s"
              + (f", settings {' '.join(args.service)}" if args.service else ""))
        out: dict = {"model": args.model, "date": time.strftime("%Y-%m-%d", time.gmtime()),
                     "commit": git_commit(ROOT)[:7],
                     "concurrency": args.concurrency, "startup_s": round(startup, 1), "settings": args.service}
        try:
            with httpx.Client(base_url=url, timeout=60) as c:
                # warm-up, and the /explain texts: sentences where /check finds a site
                rng = random.Random(args.seed + 1)
                cands = rng.sample(pools["medium"] + pools["w20"], min(80, len(pools["medium"]) + len(pools["w20"])))
                explain_texts = []
                for t in cands:
                    r = c.post("/check", json={"text": t})
                    if r.status_code == 200 and r.json()["n_sites"]:
                        explain_texts.append(t)
                for t in explain_texts[:3]:
                    c.post("/explain", json={"text": t})
                    c.post("/check_batch", json={"texts": [t]})
                if not explain_texts:
                    raise SystemExit("no test sentence with an agreement site")
            # BentoML's batching dispatcher first trains its latency model on ~20 requests sent one by one:
            # a concurrent burst of each kind before anything is measured
            burst = [Req("check_batch", "/check_batch", {"texts": [t]}) for t in pools["w20"] * 3]
            burst += [Req("check", "/check", {"text": t}) for t in pools["w20"] * 2]
            asyncio.run(run_requests(url, burst, args.concurrency, deadline))
            with httpx.Client(base_url=url, timeout=60) as c:
                # 1. latency: 20-word /check one at a time
                w20 = pools["w20"]
                if args.seq_n:
                    print(f"\n[1] sequential /check, 20-word sentences, {args.seq_n} requests ({loadavg()})")
                lat = []
                for i in range(args.seq_n):
                    if time.monotonic() > deadline:
                        break
                    t0 = time.perf_counter()
                    r = c.post("/check", json={"text": w20[i % len(w20)]})
                    lat.append((time.perf_counter() - t0) * 1000)
                    if r.status_code != 200:
                        raise SystemExit(f"/check answered {r.status_code}: {r.text[:300]}")
            if lat:
                p50, p99 = pct(lat, 50), pct(lat, 99)
                print(f"  p50 {p50:.1f} ms, p99 {p99:.1f} ms, mean {statistics.fmean(lat):.1f} ms over {len(lat)} "
                      f"(target p50 <= {TARGET_P50_MS:g} ms: {'met' if p50 <= TARGET_P50_MS else 'NOT met'}; "
                      f"p99 <= {TARGET_P99_MS:g} ms: {'met' if p99 <= TARGET_P99_MS else 'NOT met'})")
                out["sequential_check_20w"] = {"n": len(lat), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
                                               "mean_ms": round(statistics.fmean(lat), 2)}

            # 2. batching comparison at concurrency 32
            if args.compare_n:
                compare(args, url, w20, deadline, out)

            # 3. the mixed load
            reqs = mixed_requests(args.n, pools, explain_texts, pairs, args.seed)
            before = loadavg()
            res, wall = asyncio.run(run_requests(url, reqs, args.concurrency, deadline))
            s = summarize(res, wall)
            print_table(f"\n[3] mixed load, concurrency {args.concurrency} ({before} at start, {loadavg()} at end)", s)
            statuses: dict[str, int] = defaultdict(int)
            for _, _, st, _ in res:
                statuses[str(st) if st is not None else "transport error"] += 1
            print("  statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
            if len(res) < len(reqs):
                print(f"  stopped at --max-seconds: {len(reqs) - len(res)} requests not sent")
            out["mixed"] = {**{k: s[k] for k in ("n", "errors", "unexpected")}, "rps": round(s["rps"], 1),
                            "wall_s": round(s["wall_s"], 1), "loadavg_start": before, "loadavg_end": loadavg(),
                            "statuses": dict(statuses),
                            "rows": {k: {kk: round(vv, 1) if isinstance(vv, float) else vv for kk, vv in v.items()}
                                     for k, v in s["rows"].items()}}
            # BentoML logs its own input validation (answered 400) with a traceback: count 5xx answers only
            server_5xx = log_path.read_text(errors="replace").count("(status=5")
            print(f"  server log: {server_5xx} request(s) answered 5xx in the whole run")
            out["server_5xx"] = server_5xx
        finally:
            stop_service(proc)
            print(f"service pid {proc.pid} stopped (exit {proc.returncode})")
            if args.log:
                args.log.write_bytes(log_path.read_bytes())
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    if "compare" in out:
        ours, base = out["compare"]["check_batch"]["rps"], out["compare"]["check"]["rps"]
        print(f"RESULT checker_load ratio={ours / base:.2f} ours={ours:.1f} baseline={base:.1f} req/s")
    else:
        print("no RESULT line: the batching comparison was skipped (--compare-n 0)")


def compare(args, url: str, w20: list[str], deadline: float, out: dict) -> None:
    """Phase 2: the same 20-word sentences as one-text /check vs one-text /check_batch requests."""
    print(f"\n[2] 20-word sentences at concurrency {args.concurrency}, {args.compare_n} requests per arm, "
          f"best of {args.rounds} rounds")
    texts = [w20[i % len(w20)] for i in range(args.compare_n)]
    base_reqs = [Req("check", "/check", {"text": t}) for t in texts]
    ours_reqs = [Req("check_batch", "/check_batch", {"texts": [t]}) for t in texts]
    best = {"check": None, "check_batch": None}
    for rnd in range(args.rounds):
        for name, reqs in (("check", base_reqs), ("check_batch", ours_reqs)):
            res, wall = asyncio.run(run_requests(url, reqs, args.concurrency, deadline))
            s = summarize(res, wall)
            row = s["rows"].get(name, {})
            print(f"  round {rnd + 1} /{name:<11} {s['rps']:7.1f} req/s  p50 {row.get('p50_ms', 0):7.1f} ms  "
                  f"p99 {row.get('p99_ms', 0):7.1f} ms  errors {s['errors']}  unexpected {s['unexpected']}  "
                  f"({loadavg()})")
            if best[name] is None or s["rps"] > best[name]["rps"]:
                best[name] = {"rps": round(s["rps"], 1), "p50_ms": round(row.get("p50_ms", 0), 1),
                              "p99_ms": round(row.get("p99_ms", 0), 1), "errors": s["errors"], "n": s["n"]}
    out["compare"] = best
    rps_b = best["check_batch"]["rps"]
    print(f"  batched {rps_b:.1f} req/s vs unbatched {best['check']['rps']:.1f} req/s "
          f"(target >= {TARGET_RPS:g} req/s with batching: {'met' if rps_b >= TARGET_RPS else 'NOT met'})")


if __name__ == "__main__":
    main()
