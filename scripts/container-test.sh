#!/usr/bin/env bash
# Container test (`make container-test`, `make container-test-tiny`): build the service and worker images
# (Dockerfile) on a local Debian bookworm base made with debootstrap, so no image registry is needed, then run
# them on loopback and check them:
#
#   1. tools      podman, buildah, debootstrap, runc (apt-get install when missing and run as root)
#   2. base       localhost/agreelens-base: debootstrap --variant=minbase bookworm + python3 (3.11),
#                 python3-venv, ca-certificates, imported with `podman import`; cached: built once
#   3. context    the CPU torch wheel -> docker/wheels/ (from TORCH_WHEEL, PIP_FIND_LINKS or /opt/wheels),
#                 `pip freeze` of .venv -> docker/pins/constraints.txt (CONTAINER_PIN=0: no pins).
#                 CONTAINER_MODEL=tiny: a model of the tiny profile (20k sentences, 6k words, 40 steps) is
#                 trained in seconds in a scratch project ($CONTAINER_STATE/tiny, with its calibration and
#                 number units; in the background from the start) and the build context is a staging copy of
#                 this checkout with that model as models/large ($CONTAINER_STATE/context); the checkout's
#                 models/ and metrics/ are not touched
#   4. build      buildah bud --isolation chroot --layers --build-arg BASE_IMAGE=localhost/agreelens-base,
#                 --target service (layers cached: a rerun with unchanged inputs takes seconds)
#   5. run        podman run -p 127.0.0.1:PORT:3000; /readyz within CONTAINER_READY_TIMEOUT wall-clock seconds
#   6. checks     /livez, /readyz, the image's HEALTHCHECK, non-root user, model files root:root 0644, CPU-only
#                 torch, POST /check of "The boys near the car likes the girl.": `likes` is an error with
#                 suggestion `like` (real model), or a site `likes` with alternate `like` and a numeric margin
#                 (tiny model: too small to judge it)
#   7. unreadable the same image with a 0600 root-owned model mounted over /app/models/large: the container
#                 must exit with status 3 within 30 s, its log naming the file ("permission denied")
#   8. registry   only with CONTAINER_TEST_REGISTRY=1: a throwaway MLflow server (.venv) on loopback with the
#                 model registered as agreelens-large@champion; a second container (--network host) pulls it
#                 at start (no fallback in its log, the model under /tmp/agreelens-registry-*) instead of the
#                 baked-in model, and answers /check; then, with that server stopped, a third container must
#                 fall back to the baked-in model (bounded MLflow retries)
#   9. worker     --target worker (its pip layer on top of the service's); `agreelens --help`, `dvc --version`,
#                 `dvc status` (in /app: no git, DVC without SCM), `pipeline --help`, non-root, CPU-only torch
#
# The last line is `container-test: OK` only when every step ran and passed; a failed step or a signal
# (INT, TERM, HUP) prints `container-test: FAILED at <step>`, after the log tail of any container and the
# timings so far. Heavy steps run under `nice -n 19 ionice -c3`. Image storage, the debootstrap log and the
# build logs live in CONTAINER_STATE (default /var/tmp/agreelens-container); CONTAINER_RESET=1 empties it
# first (its containers, images and overlay mounts; nothing else), so the run starts from nothing.
# Environment: CONTAINER_PORT (default: a free port), CONTAINER_READY_TIMEOUT (wall-clock seconds, default
# 300), CONTAINER_MODEL (default: the checkout's models/large; tiny: see 3.), CONTAINER_IMAGE (default
# localhost/agreelens:service), CONTAINER_WORKER_IMAGE (default localhost/agreelens:worker), CONTAINER_BASE
# (default localhost/agreelens-base), DEBIAN_MIRROR, CONTAINER_RUNTIME (default runc), CONTAINER_PIP_CA (CA
# bundle for pip in the build; default PIP_CERT, else SSL_CERT_FILE; empty: none), VENV (default .venv).
#
# Sandbox notes (why the flags): this host lacks CAP_SYS_RESOURCE, so podman's default rlimits (nofile
# 1048576) cannot be set: the limits are lowered explicitly; Debian's crun refuses hybrid cgroup v1/v2
# hosts, so the runtime is runc; no systemd, so cgroupfs and file events, and no healthcheck timer (the
# HEALTHCHECK command is run once with `podman healthcheck run`).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
STATE=${CONTAINER_STATE:-/var/tmp/agreelens-container}
BASE=${CONTAINER_BASE:-localhost/agreelens-base}
IMAGE=${CONTAINER_IMAGE:-localhost/agreelens:service}
WORKER_IMAGE=${CONTAINER_WORKER_IMAGE:-localhost/agreelens:worker}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
MODEL=${CONTAINER_MODEL:-large}
SUITE=bookworm
VENV=${VENV:-$REPO/.venv}
[[ $VENV = /* ]] || VENV=$REPO/$VENV
READY_TIMEOUT=${CONTAINER_READY_TIMEOUT:-300}
EXIT_STARTUP_FAILED=3  # services/service.py: a worker could not load the model
NAME=agreelens-ct-$$
SENTENCE="The boys near the car likes the girl."
if [[ $MODEL != large && $MODEL != tiny ]]; then
  echo "error: CONTAINER_MODEL=$MODEL; use large (the checkout's models/large) or tiny" >&2; exit 2
fi
mkdir -p "$STATE"

NICE=(nice -n 19 ionice -c3)
STORE=(--root "$STATE/storage" --runroot "$STATE/run" --storage-driver overlay)
PODMAN=(podman "${STORE[@]}" --runtime "${CONTAINER_RUNTIME:-runc}" --cgroup-manager cgroupfs --events-backend file)
BUILDAH=(buildah "${STORE[@]}")
NOFILE=${CONTAINER_NOFILE:-16384}
NPROC=${CONTAINER_NPROC:-8192}
LIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")

# ------------------------------------------------------------------------------------------ steps, timings, exit
declare -a TIMES=()
T0=$(date +%s.%N)
STEP="start"
ALL_CHECKS_PASSED=0
CHILD=""
now() { date +%s.%N; }
step() { STEP=$1; T=$(now); echo "-- $STEP"; }
took() {  # records the current step's time
  local s; s=$(awk -v a="$T" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  TIMES+=("$(printf '%-36s %8s s' "$STEP" "$s")")
  echo "== $STEP: ${s} s"
}
summary() {
  echo
  echo "== container-test $(date -u +%FT%TZ) on $(hostname) ($(nproc) cores), model $MODEL"
  local t
  for t in "${TIMES[@]}"; do echo "   $t"; done
  printf '   %-36s %8s s\n' "total" "$(awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')"
}
# a long command in the background, so that a signal is handled at once (bash runs traps only between commands)
run() { "$@" & CHILD=$!; local rc=0; wait "$CHILD" || rc=$?; CHILD=""; return "$rc"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

CONTAINERS=()
MLFLOW_PID=""
TINY_PID=""
exec 3>&1 4>&2  # the script's own stdout/stderr: a trap may fire inside a command redirected to a log
cleanup() {
  local rc=$?
  trap '' INT TERM HUP
  finish "$rc" >&3 2>&4
}
finish() {
  local rc=$1 c
  if [[ -n $CHILD ]]; then kill -TERM "$CHILD" 2>/dev/null || true; wait "$CHILD" 2>/dev/null || true; fi
  for c in "${CONTAINERS[@]}"; do
    if [[ $ALL_CHECKS_PASSED != 1 ]] && "${PODMAN[@]}" container exists "$c" 2>/dev/null; then
      echo "-- last log lines of $c:"; "${PODMAN[@]}" logs --tail 40 "$c" 2>&1 | cut -c1-400 || true
    fi
    "${PODMAN[@]}" rm -f -t 5 "$c" >/dev/null 2>&1 || true
  done
  if [[ -n $MLFLOW_PID ]]; then kill -- "-$MLFLOW_PID" 2>/dev/null || true; fi
  if [[ -n $TINY_PID ]]; then kill -- "-$TINY_PID" 2>/dev/null || true; fi
  summary
  if [[ $ALL_CHECKS_PASSED == 1 && $rc -eq 0 ]]; then
    echo "container-test: OK"
  else
    echo "container-test: FAILED at $STEP (exit $rc)"
    [[ $rc -ne 0 ]] || rc=1
  fi
  exit "$rc"
}
on_signal() { echo "container-test: got SIG$1 during $STEP" >&4; STEP="$STEP (SIG$1)"; exit "$2"; }
trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

STEP="0. inputs"
if [[ $MODEL == large ]]; then
  for f in models/large/model.safetensors models/large/config.json models/large/vocab.txt \
           metrics/calibration_large.json metrics/units_large.json; do
    [[ -f $f ]] || { echo "error: $f missing: run \`make run\` first, or CONTAINER_MODEL=tiny (make container-test-tiny)" >&2; exit 2; }
  done
fi

# ------------------------------------------------------------------------------------------ 0. reset (optional)
if [[ ${CONTAINER_RESET:-0} == 1 && -d $STATE ]]; then  # start over: this script's storage only
  step "0. reset"
  echo "reset: removing containers, images and mounts under $STATE"
  "${BUILDAH[@]}" rm --all >/dev/null 2>&1 || true
  "${PODMAN[@]}" rm -af -t 5 >/dev/null 2>&1 || true
  "${PODMAN[@]}" rmi -af >/dev/null 2>&1 || true
  awk -v s="$STATE/" 'index($2, s) == 1 || $2 == s "storage/overlay" {print $2}' /proc/mounts | sort -r | while read -r m; do
    umount "$m" || true
  done
  rm -rf "$STATE"
  mkdir -p "$STATE"
  took
fi

# ------------------------------------------------------------------------------------------ tiny model (background)
# CONTAINER_MODEL=tiny: the tiny profile with enough text that the test sentence's words are in the vocabulary,
# no BERT or syntactic augmentation; the stage commands the model, its calibration and number units need (from
# the stage registry, `agreelens stages --for`), with this checkout's code, in a scratch project while steps 1-3 run
TINY=$STATE/tiny
if [[ $MODEL == tiny ]]; then
  STEP="0. tiny model (start)"
  [[ -x $VENV/bin/python ]] || { echo "error: no $VENV/bin/python to train the tiny model: run \`make install\`" >&2; exit 2; }
  rm -rf "$TINY"
  mkdir -p "$TINY"
  ln -s "$REPO/corpora" "$TINY/corpora"
  "$VENV/bin/python" - "$REPO/params.yaml" "$TINY/params.yaml" <<'EOF'
import sys, yaml
p = yaml.safe_load(open(sys.argv[1]))
p["profile"] = "tiny"
p["augment"]["enabled"] = False
tiny = p["profiles"]["tiny"]
tiny.setdefault("data", {})["max_sentences"] = 20000
tiny.setdefault("prepare", {})["max_vocab"] = 6000
p["syntax"]["enabled"] = False  # the syntactic augmentation: off, its output is the augmented text alone
yaml.safe_dump(p, open(sys.argv[2], "w"), sort_keys=False)
EOF
  { echo data; PYTHONPATH="$REPO" "$VENV/bin/python" -m agreelens.cli stages --params "$TINY/params.yaml" \
      --for train_large --for calibrate@large --for sweep@large | sed 's/^agreelens //'; } >"$TINY/steps.txt"
  cat >"$TINY/train.sh" <<EOF
set -euo pipefail
cd "$TINY"
export PYTHONPATH="$REPO" MLFLOW_TRACKING_URI="sqlite:///$TINY/mlflow.db" PREFECT_HOME="$TINY/.prefect"
while read -r cmd; do
  echo "== agreelens \$cmd"
  ${NICE[*]} "$VENV/bin/python" -m agreelens.cli \$cmd </dev/null
done <steps.txt
EOF
  setsid bash "$TINY/train.sh" >"$TINY/train.log" 2>&1 </dev/null &
  TINY_PID=$!
fi

# ------------------------------------------------------------------------------------------ 1. tools
step "1. tools"
missing=()
for tool in podman buildah debootstrap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "error: missing ${missing[*]}; install podman buildah debootstrap runc (Debian: apt-get install)" >&2
    exit 1
  fi
  echo "installing podman buildah debootstrap runc (apt-get)"
  run "${NICE[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive run "${NICE[@]}" apt-get install -y -qq --no-install-recommends \
    podman buildah debootstrap runc uidmap netavark aardvark-dns containernetworking-plugins iptables >/dev/null
fi
echo "podman $(podman --version | awk '{print $3}'), buildah $(buildah --version | awk '{print $3}'), runc $(runc --version | awk 'NR==1 {print $3}')"
took

# ------------------------------------------------------------------------------------------ 2. base
if "${PODMAN[@]}" image exists "$BASE"; then
  step "2. base image (cached)"
  echo "base image $BASE: cached ($("${PODMAN[@]}" image inspect -f '{{.Created}}' "$BASE" | cut -c1-19))"
else
  step "2. base image (debootstrap+import)"
  rootfs=$STATE/rootfs
  rm -rf "$rootfs"
  echo "debootstrap $SUITE (minbase + python3 python3-venv ca-certificates) from $MIRROR; log: $STATE/debootstrap.log"
  if ! run "${NICE[@]}" debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      "$SUITE" "$rootfs" "$MIRROR" >"$STATE/debootstrap.log" 2>&1; then
    tail -n 30 "$STATE/debootstrap.log" >&2; exit 1
  fi
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb http://deb.debian.org/debian $SUITE main
deb http://deb.debian.org/debian $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/tmp/*
  echo "python in the base: $(chroot "$rootfs" python3 -V 2>&1)"
  tar -C "$rootfs" --numeric-owner -cf - . | "${NICE[@]}" "${PODMAN[@]}" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' --quiet - "$BASE" >/dev/null
  rm -rf "$rootfs"
fi
echo "base image $BASE: $("${PODMAN[@]}" image inspect -f '{{.Size}}' "$BASE" | awk '{printf "%.0f MB", $1/1e6}')"
took

# ------------------------------------------------------------------------------------------ 3. context
step "3. build context"
wheel=""
for cand in ${TORCH_WHEEL:-} ${PIP_FIND_LINKS:-} /opt/wheels; do
  cand=${cand#file://}
  if [[ -f $cand && $cand == *torch-2.13.0+cpu-cp311-*.whl ]]; then wheel=$cand; break; fi
  if [[ -d $cand ]]; then
    w=$(ls "$cand"/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -n1 || true)
    if [[ -n $w ]]; then wheel=$w; break; fi
  fi
done
mkdir -p docker/wheels docker/pins
if [[ -z $wheel ]]; then
  echo "no local torch-2.13.0+cpu-cp311 wheel; downloading it (no dependencies) with $VENV's pip"
  run "${NICE[@]}" "$VENV/bin/python" -m pip download -q --no-deps --only-binary :all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 -d docker/wheels "torch==2.13.0+cpu"
  wheel=$(ls docker/wheels/torch-2.13.0+cpu-cp311-*.whl | head -n1)
fi
dst=docker/wheels/$(basename "$wheel")
for old in docker/wheels/*.whl; do [[ -e $old && $old != "$dst" ]] && rm -f "$old"; done
if [[ $(readlink -f "$wheel") != $(readlink -f "$dst") ]] && \
   ! { [[ -f $dst ]] && [[ $(stat -c %s "$dst") == $(stat -c %s "$wheel") ]]; }; then
  ln -f "$wheel" "$dst" 2>/dev/null || cp -f "$wheel" "$dst"
fi
echo "torch wheel: $dst ($(du -h "$dst" | cut -f1))"
if [[ ${CONTAINER_PIN:-1} != 0 && -x $VENV/bin/python ]]; then
  "$VENV/bin/python" -m pip freeze --exclude-editable 2>/dev/null | grep -viE '^agreelens([ =@]|$)' >docker/pins/constraints.txt.new
  mv docker/pins/constraints.txt.new docker/pins/constraints.txt
  echo "pins: docker/pins/constraints.txt ($(wc -l <docker/pins/constraints.txt) packages from $VENV)"
else
  rm -f docker/pins/constraints.txt
  echo "pins: none (newest versions that fit)"
fi
CONTEXT=$REPO
MODEL_DIR=$REPO/models/large
took

if [[ $MODEL == tiny ]]; then
  # the tiny profile with enough text that the test sentence's words are in the vocabulary; no BERT augmentation
  step "3t. tiny model (scratch project)"
  rc=0; wait "$TINY_PID" || rc=$?
  TINY_PID=""
  if [[ $rc -ne 0 ]]; then tail -n 30 "$TINY/train.log" >&2; echo "error: tiny model training failed (exit $rc)" >&2; exit 1; fi
  grep '^== agreelens' "$TINY/train.log" | sed 's/^== /   /'
  MODEL_DIR=$TINY/models/large
  echo "   tiny model: $(wc -l <"$MODEL_DIR/vocab.txt") words, $(du -h "$MODEL_DIR/model.safetensors" | cut -f1); log: $TINY/train.log"
  took

  step "3c. staging context"
  CONTEXT=$STATE/context
  rm -rf "$CONTEXT"
  mkdir -p "$CONTEXT/models" "$CONTEXT/metrics" "$CONTEXT/.dvc" "$CONTEXT/docker"
  cp -a Dockerfile .dockerignore pyproject.toml README.md params.yaml dvc.yaml dvc.lock data.dvc .dvcignore \
    agreelens flows services corpora "$CONTEXT/"
  cp -a .dvc/config "$CONTEXT/.dvc/"
  cp -a docker/requirements-service.txt docker/worker-entrypoint.sh docker/pins "$CONTEXT/docker/"
  mkdir -p "$CONTEXT/docker/wheels"
  ln "$dst" "$CONTEXT/docker/wheels/" 2>/dev/null || cp "$dst" "$CONTEXT/docker/wheels/"
  cp -a "$MODEL_DIR" "$CONTEXT/models/large"
  cp -a "$TINY/metrics/calibration_large.json" "$TINY/metrics/units_large.json" "$CONTEXT/metrics/"
  echo "   $CONTEXT: this checkout's sources + the tiny model as models/large"
  took
fi

# ------------------------------------------------------------------------------------------ 4. build
# pip inside the build trusts this host's CA bundle where one is configured (a TLS-intercepting proxy):
# bind-mounted into the build stages only, never copied into an image
CA=${CONTAINER_PIP_CA-${PIP_CERT:-${SSL_CERT_FILE:-}}}
CA_ARGS=()
if [[ -n $CA && -f $CA ]]; then
  CA_ARGS=(-v "$(readlink -f "$CA"):/etc/pip-ca.crt:ro" --build-arg PIP_CA_BUNDLE=/etc/pip-ca.crt)
  echo "pip CA bundle for the build: $CA"
fi
build() {  # target image
  local log=$STATE/build-$1.log
  echo "buildah bud --target $1 -t $2 $CONTEXT (log: $log)"
  if ! run "${NICE[@]}" "${BUILDAH[@]}" bud --isolation chroot --layers --force-rm --format docker --pull=never \
      "${LIMITS[@]}" "${CA_ARGS[@]}" --build-arg BASE_IMAGE="$BASE" --target "$1" -t "$2" \
      -f "$CONTEXT/Dockerfile" "$CONTEXT" >"$log" 2>&1; then
    tail -n 40 "$log" >&2; exit 1
  fi
  echo "   $(grep -cE 'STEP [0-9]+/[0-9]+:' "$log") steps, $(grep -c -- '--> Using cache' "$log") from the layer cache"
  grep -E '^torch 2' "$log" | sed 's/^/   /' || true
}
step "4. build service image"
build service "$IMAGE"
SIZE=$("${PODMAN[@]}" image inspect -f '{{.Size}}' "$IMAGE")
echo "image $IMAGE: $(awk -v s="$SIZE" 'BEGIN { printf "%.0f MB (%d bytes)", s/1e6, s }')"
took
TIMES+=("$(printf '%-36s %8s MB' "   service image size" "$(awk -v s="$SIZE" 'BEGIN { printf "%.0f", s/1e6 }')")")

# ------------------------------------------------------------------------------------------ 5. run
get() { curl -sS --connect-timeout 2 -m 5 -o /dev/null -w '%{http_code}' "$1" 2>/dev/null || true; }
state() { "${PODMAN[@]}" inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$1" 2>/dev/null || echo "gone -"; }
wait_ready() {  # name url: 200 from url within READY_TIMEOUT wall-clock seconds, else fail
  local deadline=$((SECONDS + READY_TIMEOUT)) st
  while ((SECONDS < deadline)); do
    [[ $(get "$2") == 200 ]] && return 0
    st=$(state "$1")
    if [[ $st != running* ]]; then
      echo "error: container $1 is not running ($st: status, exit code)" >&2; return 1
    fi
    sleep 1
  done
  echo "error: $2 not ready after $READY_TIMEOUT s (wall clock)" >&2; return 1
}
check_answer() {  # json on stdin; $1: "large" (the verdict is checked) or "tiny" (the site is)
  python3 -c '
import json, numbers, sys
strict = sys.argv[1] != "tiny"
r = json.load(sys.stdin)
sites = [s for sent in r["sentences"] for s in sent["sites"]]
flag = [s for s in sites if s["word"] == "likes"]
assert flag, "no site likes: %s" % r
f = flag[0]
assert f["alternate"] == "like" and isinstance(f["margin"], numbers.Real), f
if strict:
    assert f["verdict"] == "error" and f["suggestion"] == "like", "likes not flagged: %s" % f
print("   /check: model=%s threshold=%s n_sites=%s n_errors=%s; likes: alternate=%s verdict=%s margin=%s confidence=%s suggestion=%s; notes=%s"
      % (r["model"], r["threshold"], r["n_sites"], r["n_errors"], f["alternate"], f["verdict"], f["margin"],
         f["confidence"], f["suggestion"], r["notes"]))
' "$1"
}
post_check() {  # base-url
  curl -sS --connect-timeout 2 -m 60 -H 'Content-Type: application/json' -d "{\"text\": \"$SENTENCE\"}" "$1/check"
}
quiet() { grep -v 'systemd connection' >&2; }  # no systemd here: no healthcheck timer (said twice)

PORT=${CONTAINER_PORT:-$(free_port)}
URL=http://127.0.0.1:$PORT
step "5a. container start"
CONTAINERS+=("$NAME")
"${PODMAN[@]}" run -d --name "$NAME" "${LIMITS[@]}" --health-interval disable -p "127.0.0.1:$PORT:3000" "$IMAGE" \
  2> >(quiet) >/dev/null
echo "container $NAME on $URL"
took
step "5b. ready (/readyz 200)"
wait_ready "$NAME" "$URL/readyz"
took

# ------------------------------------------------------------------------------------------ 6. checks
step "6. checks"
code=$(get "$URL/livez"); echo "   GET /livez: $code"; [[ $code == 200 ]]
code=$(get "$URL/readyz"); echo "   GET /readyz: $code"; [[ $code == 200 ]]
if "${PODMAN[@]}" healthcheck run "$NAME" >/dev/null 2>&1; then echo "   HEALTHCHECK (podman healthcheck run): healthy"
else echo "   HEALTHCHECK (podman healthcheck run): unhealthy" >&2; exit 1; fi
uid=$("${PODMAN[@]}" exec "$NAME" id -u); echo "   user: $("${PODMAN[@]}" exec "$NAME" id -un) (uid $uid)"; [[ $uid != 0 ]]
modes=$("${PODMAN[@]}" exec "$NAME" sh -c 'cd /app && stat -c "%a %U:%G" models models/large models/large/* metrics metrics/* agreelens services' | sort | uniq -c)
echo "   /app modes (count, mode, owner):" $modes
bad=$(grep -vE '^ *[0-9]+ (644|755) root:root$' <<<"$modes" || true)
[[ -z $bad ]] || { echo "error: files the service reads must be root:root 0644 / 0755: $bad" >&2; exit 1; }
"${PODMAN[@]}" exec "$NAME" python -c '
import importlib.metadata as md, torch
bad = sorted(n for n in (d.metadata["Name"] for d in md.distributions())
             if n.lower().startswith(("nvidia-", "triton")) and n.lower() != "nvidia-ml-py")  # NVML bindings (bentoml), no CUDA
print(f"   torch {torch.__version__} cuda={torch.version.cuda} nvidia/triton wheels: {bad or None}")
assert torch.version.cuda is None and not bad'
"${PODMAN[@]}" exec "$NAME" env | grep -E '^(BENTOML_DO_NOT_TRACK|DO_NOT_TRACK|MLFLOW_DISABLE_TELEMETRY)=' | sed 's/^/   env: /'
post_check "$URL" | check_answer "$MODEL"
"${PODMAN[@]}" logs "$NAME" 2>&1 | grep -E 'falling back|agreelens: serving' | sed 's/^/   log: /' | cut -c1-200 || true
took

step "6b. stop + remove"
"${PODMAN[@]}" rm -f -t 10 "$NAME" 2> >(quiet) >/dev/null
CONTAINERS=()
took

# ------------------------------------------------------------------------------------------ 7. unreadable model
# a model saved 0600 by another user (what a mkdtemp directory renamed into place used to leave): the service
# must stop at once, naming the file, so an orchestrator sees the exit instead of a port that never answers
step "7. unreadable model: exit 3 <= 30 s"
BROKEN=$STATE/unreadable-model
rm -rf "$BROKEN"
cp -r "$MODEL_DIR" "$BROKEN"
chown -R root:root "$BROKEN"
chmod 0755 "$BROKEN"
chmod 0600 "$BROKEN"/*
UNAME=$NAME-unreadable
CONTAINERS+=("$UNAME")
t0=$SECONDS
"${PODMAN[@]}" run -d --name "$UNAME" "${LIMITS[@]}" --health-interval disable -p "127.0.0.1:$PORT:3000" \
  -v "$BROKEN:/app/models/large:ro" "$IMAGE" 2> >(quiet) >/dev/null
while (( SECONDS - t0 < 30 )) && [[ $(state "$UNAME") == running* ]]; do sleep 1; done
read -r st code <<<"$(state "$UNAME")"
echo "   after $((SECONDS - t0)) s: $st, exit code $code"
[[ $st == exited && $code == "$EXIT_STARTUP_FAILED" ]] || { echo "error: expected exited with $EXIT_STARTUP_FAILED" >&2; exit 1; }
named=$("${PODMAN[@]}" logs "$UNAME" 2>&1 | grep -m1 'the service cannot start' | cut -c1-300 || true)
echo "   log: $named"
grep -q '/app/models/large/[a-z.]*: permission denied' <<<"$named"
code=$(get "$URL/readyz"); echo "   GET /readyz after the exit: $([[ $code == 000 ]] && echo "connection refused" || echo "$code")"
[[ $code != 200 ]]
"${PODMAN[@]}" rm -f -t 5 "$UNAME" 2> >(quiet) >/dev/null
CONTAINERS=()
rm -rf "$BROKEN"
took

# ------------------------------------------------------------------------------------------ 8. registry (optional)
if [[ ${CONTAINER_TEST_REGISTRY:-0} == 1 ]]; then
  step "8a. MLflow server + register"
  reg=$(mktemp -d "$STATE/registry.XXXXXX")
  MLPORT=$(free_port)
  echo "MLflow server on 127.0.0.1:$MLPORT (store $reg)"
  setsid env MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true "$VENV/bin/mlflow" server --host 127.0.0.1 \
    --port "$MLPORT" --workers 1 --backend-store-uri "sqlite:///$reg/mlflow.db" \
    --artifacts-destination "$reg/artifacts" >"$reg/server.log" 2>&1 &
  MLFLOW_PID=$!
  deadline=$((SECONDS + 120))
  while ((SECONDS < deadline)) && [[ $(get "http://127.0.0.1:$MLPORT/health") != 200 ]]; do sleep 1; done
  [[ $(get "http://127.0.0.1:$MLPORT/health") == 200 ]] || { tail -n 30 "$reg/server.log" >&2; exit 1; }
  (cd "$reg" && MLFLOW_TRACKING_URI=http://127.0.0.1:$MLPORT PYTHONPATH=$REPO "${NICE[@]}" "$VENV/bin/python" -c "
from agreelens.registry import register
d = register('$MODEL_DIR', 'agreelens-large', {'test_ppl': 1.0, 'na_accuracy': 1.0})
print(f'   registered {d.name} version {d.version} as @{d.alias}')" 2>&1 | grep -E '^   registered|Error' )
  took
  step "8b. registry model: start+check"
  RPORT=$(free_port)
  RNAME=$NAME-registry
  CONTAINERS+=("$RNAME")
  "${PODMAN[@]}" run -d --name "$RNAME" "${LIMITS[@]}" --health-interval disable --network host \
    -e MLFLOW_TRACKING_URI="http://127.0.0.1:$MLPORT" -e AGREELENS_SERVICE_MODEL="models:/agreelens-large@champion" \
    "$IMAGE" bentoml serve services.service:AgreeLens --host 127.0.0.1 --port "$RPORT" 2> >(quiet) >/dev/null
  wait_ready "$RNAME" "http://127.0.0.1:$RPORT/readyz"
  post_check "http://127.0.0.1:$RPORT" | check_answer "$MODEL"
  if "${PODMAN[@]}" logs "$RNAME" 2>&1 | grep -E 'unavailable|falling back'; then
    echo "error: the registry model was not loaded (fallback above)" >&2; exit 1
  fi
  fetched=$("${PODMAN[@]}" exec "$RNAME" find /tmp -path '/tmp/agreelens-registry-*' -name model.safetensors 2>/dev/null || true)
  echo "   model fetched from the registry: ${fetched:-none}"
  [[ -n $fetched ]]
  "${PODMAN[@]}" logs "$RNAME" 2>&1 | grep -E 'falling back|agreelens: serving' | sed 's/^/   log: /' | cut -c1-200 || true
  "${PODMAN[@]}" rm -f -t 10 "$RNAME" 2> >(quiet) >/dev/null
  CONTAINERS=()
  kill -- "-$MLFLOW_PID" 2>/dev/null || true
  MLFLOW_PID=""
  rm -rf "$reg"
  took
  # a registry that refuses connections (the server just stopped): the start falls back to the baked model
  step "8c. registry down: fallback+check"
  DNAME=$NAME-deadregistry
  CONTAINERS+=("$DNAME")
  "${PODMAN[@]}" run -d --name "$DNAME" "${LIMITS[@]}" --health-interval disable --network host \
    -e MLFLOW_TRACKING_URI="http://127.0.0.1:$MLPORT" "$IMAGE" \
    bentoml serve services.service:AgreeLens --host 127.0.0.1 --port "$RPORT" 2> >(quiet) >/dev/null
  wait_ready "$DNAME" "http://127.0.0.1:$RPORT/readyz"
  post_check "http://127.0.0.1:$RPORT" | check_answer "$MODEL"
  "${PODMAN[@]}" logs "$DNAME" 2>&1 | grep -E 'could not be loaded' | sed 's/^/   log: /' | cut -c1-200 | grep .
  "${PODMAN[@]}" rm -f -t 10 "$DNAME" 2> >(quiet) >/dev/null
  CONTAINERS=()
  took
fi

# ------------------------------------------------------------------------------------------ 9. worker
step "9a. build worker image"
build worker "$WORKER_IMAGE"
WSIZE=$("${PODMAN[@]}" image inspect -f '{{.Size}}' "$WORKER_IMAGE")
took
TIMES+=("$(printf '%-36s %8s MB' "   worker image size" "$(awk -v s="$WSIZE" 'BEGIN { printf "%.0f", s/1e6 }')")")
step "9b. worker: --help, dvc status, pipeline"
WRUN=("${PODMAN[@]}" run --rm "${LIMITS[@]}" "$WORKER_IMAGE")
out=$("${WRUN[@]}" --help)
grep -q 'Usage: agreelens' <<<"$out"
echo "   agreelens --help: $(grep -c '│ [a-z]' <<<"$out") command lines"
echo "   dvc --version: $("${WRUN[@]}" dvc --version)"
out=$("${WRUN[@]}" dvc status 2>&1) || { echo "$out" | tail -n 20 >&2; echo "error: dvc status failed in the worker image" >&2; exit 1; }
echo "   dvc status (in /app, no git, no data/ yet): $(grep -c . <<<"$out") lines, e.g. $(grep -m1 -E 'changed|deleted|up to date|Data and pipelines' <<<"$out" | sed 's/^[[:space:]]*//' | cut -c1-80)"
out=$("${WRUN[@]}" pipeline --help 2>&1) || { echo "$out" | tail -n 20 >&2; exit 1; }
grep -q -- '--profile' <<<"$out"
echo "   pipeline --help (python flows/pipeline.py): ok"
"${WRUN[@]}" python -c '
import importlib.metadata as md, os, torch
bad = sorted(n for n in (d.metadata["Name"] for d in md.distributions())
             if n.lower().startswith(("nvidia-", "triton")) and n.lower() != "nvidia-ml-py")
print(f"   uid {os.getuid()}, torch {torch.__version__} cuda={torch.version.cuda}, nvidia/triton wheels: {bad or None}")
assert os.getuid() != 0 and torch.version.cuda is None and not bad'
took

STEP="done"
ALL_CHECKS_PASSED=1
