#!/usr/bin/env bash
# Container test (`make container-test`): build the service image (Dockerfile, target `service`) on a local
# Debian bookworm base made with debootstrap, so no image registry is needed, then run it on loopback and
# check it:
#
#   1. tools      podman, buildah, debootstrap, runc (apt-get install when missing and run as root)
#   2. base       localhost/agreelens-base: debootstrap --variant=minbase bookworm + python3 (3.11),
#                 python3-venv, ca-certificates, imported with `podman import`; cached: built once
#   3. context    the CPU torch wheel -> docker/wheels/ (from TORCH_WHEEL, PIP_FIND_LINKS or /opt/wheels),
#                 `pip freeze` of .venv -> docker/pins/constraints.txt (CONTAINER_PIN=0: no pins)
#   4. build      buildah bud --isolation chroot --layers --build-arg BASE_IMAGE=localhost/agreelens-base
#                 (layers cached: a rerun with unchanged inputs takes seconds)
#   5. run        podman run -p 127.0.0.1:PORT:3000, wait for /readyz
#   6. checks     /livez, /readyz, the image's HEALTHCHECK, non-root user, CPU-only torch, POST /check
#                 ("The boys near the car likes the girl." flags "likes"), the fallback model large
#   7. cleanup    stop and remove the container (also on failure, after printing its log tail)
#   8. registry   only with CONTAINER_TEST_REGISTRY=1: a throwaway MLflow server (.venv) on loopback with
#                 models/large registered as agreelens-large@champion; a second container (--network host)
#                 pulls it at start (no fallback in its log, the model under /tmp/agreelens-registry-*)
#                 instead of the baked-in model, and answers /check; then, with that server stopped, a
#                 third container must fall back to the baked-in model (bounded MLflow retries)
#
# Heavy steps run under `nice -n 19 ionice -c3`. Image storage, the debootstrap log and the build log live
# in CONTAINER_STATE (default /var/tmp/agreelens-container); CONTAINER_RESET=1 empties it first (its
# containers, images and overlay mounts; nothing else), so the run starts from nothing.
# Environment: CONTAINER_PORT (default: a free port), CONTAINER_READY_TIMEOUT (s, default 300),
# CONTAINER_IMAGE (default localhost/agreelens:service), CONTAINER_BASE (default localhost/agreelens-base),
# DEBIAN_MIRROR, CONTAINER_RUNTIME (default runc), CONTAINER_TARGET=worker also builds the worker image
# and runs `agreelens --help` in it, CONTAINER_PIP_CA (CA bundle for pip in the build; default PIP_CERT,
# else SSL_CERT_FILE; empty: none), VENV (default .venv).
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
SUITE=bookworm
VENV=${VENV:-$REPO/.venv}
[[ $VENV = /* ]] || VENV=$REPO/$VENV
READY_TIMEOUT=${CONTAINER_READY_TIMEOUT:-300}
NAME=agreelens-ct-$$
SENTENCE="The boys near the car likes the girl."
mkdir -p "$STATE"

NICE=(nice -n 19 ionice -c3)
STORE=(--root "$STATE/storage" --runroot "$STATE/run" --storage-driver overlay)
PODMAN=(podman "${STORE[@]}" --runtime "${CONTAINER_RUNTIME:-runc}" --cgroup-manager cgroupfs --events-backend file)
BUILDAH=(buildah "${STORE[@]}")
NOFILE=${CONTAINER_NOFILE:-16384}
NPROC=${CONTAINER_NPROC:-8192}
LIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")

# ------------------------------------------------------------------------------------------ timings
declare -a TIMES=()
T0=$(date +%s.%N)
now() { date +%s.%N; }
took() {  # name start
  local s; s=$(awk -v a="$2" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  TIMES+=("$(printf '%-34s %8s s' "$1" "$s")")
  echo "== $1: ${s} s"
}
summary() {
  echo
  echo "== container-test $(date -u +%FT%TZ) on $(hostname) ($(nproc) cores)"
  local t
  for t in "${TIMES[@]}"; do echo "   $t"; done
  printf '   %-34s %8s s\n' "total" "$(awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

CONTAINERS=()
MLFLOW_PID=""
cleanup() {
  local rc=$? c
  for c in "${CONTAINERS[@]}"; do
    if [[ $rc -ne 0 ]] && "${PODMAN[@]}" container exists "$c" 2>/dev/null; then
      echo "-- last log lines of $c:"; "${PODMAN[@]}" logs --tail 40 "$c" 2>&1 || true
    fi
    "${PODMAN[@]}" rm -f -t 5 "$c" >/dev/null 2>&1 || true
  done
  if [[ -n $MLFLOW_PID ]]; then kill -- "-$MLFLOW_PID" 2>/dev/null || true; fi
  summary
  [[ $rc -eq 0 ]] && echo "container-test: OK" || echo "container-test: FAILED (exit $rc)"
}
trap cleanup EXIT

# ------------------------------------------------------------------------------------------ 0. reset (optional)
if [[ ${CONTAINER_RESET:-0} == 1 && -d $STATE ]]; then  # start over: this script's storage only
  echo "reset: removing containers, images and mounts under $STATE"
  "${BUILDAH[@]}" rm --all >/dev/null 2>&1 || true
  "${PODMAN[@]}" rm -af -t 5 >/dev/null 2>&1 || true
  "${PODMAN[@]}" rmi -af >/dev/null 2>&1 || true
  awk -v s="$STATE/" 'index($2, s) == 1 || $2 == s "storage/overlay" {print $2}' /proc/mounts | sort -r | while read -r m; do
    umount "$m" || true
  done
  rm -rf "$STATE"
  mkdir -p "$STATE"
fi

# ------------------------------------------------------------------------------------------ 1. tools
t=$(now)
missing=()
for tool in podman buildah debootstrap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "error: missing ${missing[*]}; install podman buildah debootstrap runc (Debian: apt-get install)" >&2
    exit 1
  fi
  echo "installing podman buildah debootstrap runc (apt-get)"
  "${NICE[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${NICE[@]}" apt-get install -y -qq --no-install-recommends \
    podman buildah debootstrap runc uidmap netavark aardvark-dns containernetworking-plugins iptables >/dev/null
fi
echo "podman $(podman --version | awk '{print $3}'), buildah $(buildah --version | awk '{print $3}'), runc $(runc --version | awk 'NR==1 {print $3}')"
took "1. tools" "$t"

# ------------------------------------------------------------------------------------------ 2. base
t=$(now)
if "${PODMAN[@]}" image exists "$BASE"; then
  echo "base image $BASE: cached ($("${PODMAN[@]}" image inspect -f '{{.Created}}' "$BASE" | cut -c1-19))"
  took "2. base image (cached)" "$t"
else
  rootfs=$STATE/rootfs
  rm -rf "$rootfs"
  echo "debootstrap $SUITE (minbase + python3 python3-venv ca-certificates) from $MIRROR; log: $STATE/debootstrap.log"
  if ! "${NICE[@]}" debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
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
  took "2. base image (debootstrap+import)" "$t"
fi
echo "base image $BASE: $("${PODMAN[@]}" image inspect -f '{{.Size}}' "$BASE" | awk '{printf "%.0f MB", $1/1e6}')"

# ------------------------------------------------------------------------------------------ 3. context
t=$(now)
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
  "${NICE[@]}" "$VENV/bin/python" -m pip download -q --no-deps --only-binary :all: --python-version 3.11 \
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
took "3. build context" "$t"

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
  echo "buildah bud --target $1 -t $2 (log: $log)"
  if ! "${NICE[@]}" "${BUILDAH[@]}" bud --isolation chroot --layers --force-rm --format docker --pull=never \
      "${LIMITS[@]}" "${CA_ARGS[@]}" --build-arg BASE_IMAGE="$BASE" --target "$1" -t "$2" -f Dockerfile . >"$log" 2>&1; then
    tail -n 40 "$log" >&2; exit 1
  fi
  echo "   $(grep -cE 'STEP [0-9]+/[0-9]+:' "$log") steps, $(grep -c -- '--> Using cache' "$log") from the layer cache"
  grep -E '^torch 2' "$log" | sed 's/^/   /' || true
}
t=$(now)
build service "$IMAGE"
took "4. build service image" "$t"
SIZE=$("${PODMAN[@]}" image inspect -f '{{.Size}}' "$IMAGE")
echo "image $IMAGE: $(awk -v s="$SIZE" 'BEGIN { printf "%.0f MB (%d bytes)", s/1e6, s }')"
TIMES+=("$(printf '%-34s %8s MB' "   service image size" "$(awk -v s="$SIZE" 'BEGIN { printf "%.0f", s/1e6 }')")")

# ------------------------------------------------------------------------------------------ 5. run
get() { curl -sS -m 10 -o /dev/null -w '%{http_code}' "$1" 2>/dev/null || true; }
wait_ready() {  # name url
  local i
  for ((i = 0; i < READY_TIMEOUT; i++)); do
    [[ $(get "$2") == 200 ]] && return 0
    if [[ $("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$1" 2>/dev/null) != true ]]; then
      echo "error: container $1 exited" >&2; return 1
    fi
    sleep 1
  done
  echo "error: $2 not ready after $READY_TIMEOUT s" >&2; return 1
}
check_answer() {  # json on stdin; $1: "fallback" or "registry"
  python3 -c '
import json, sys
mode = sys.argv[1]
r = json.load(sys.stdin)
sites = [s for sent in r["sentences"] for s in sent["sites"]]
flag = [s for s in sites if s["word"] == "likes"]
assert flag and flag[0]["verdict"] == "error", "likes not flagged: %s" % sites
f = flag[0]
assert f["suggestion"] == "like", f
print("   /check: model=%s threshold=%s n_sites=%s n_errors=%s; likes: verdict=%s margin=%s confidence=%s suggestion=%s; notes=%s"
      % (r["model"], r["threshold"], r["n_sites"], r["n_errors"], f["verdict"], f["margin"], f["confidence"],
         f["suggestion"], r["notes"]))
' "$1"
}
post_check() {  # base-url
  curl -sS -m 60 -H 'Content-Type: application/json' -d "{\"text\": \"$SENTENCE\"}" "$1/check"
}

PORT=${CONTAINER_PORT:-$(free_port)}
URL=http://127.0.0.1:$PORT
t=$(now)
CONTAINERS+=("$NAME")
"${PODMAN[@]}" run -d --name "$NAME" "${LIMITS[@]}" --health-interval disable -p "127.0.0.1:$PORT:3000" "$IMAGE" \
  2> >(grep -v 'systemd connection' >&2) >/dev/null  # no systemd here: no healthcheck timer (said twice)
echo "container $NAME on $URL"
took "5a. container start" "$t"
t=$(now)
wait_ready "$NAME" "$URL/readyz"
took "5b. ready (/readyz 200)" "$t"

# ------------------------------------------------------------------------------------------ 6. checks
t=$(now)
code=$(get "$URL/livez"); echo "   GET /livez: $code"; [[ $code == 200 ]]
code=$(get "$URL/readyz"); echo "   GET /readyz: $code"; [[ $code == 200 ]]
if "${PODMAN[@]}" healthcheck run "$NAME" >/dev/null 2>&1; then echo "   HEALTHCHECK (podman healthcheck run): healthy"
else echo "   HEALTHCHECK (podman healthcheck run): unhealthy" >&2; exit 1; fi
uid=$("${PODMAN[@]}" exec "$NAME" id -u); echo "   user: $("${PODMAN[@]}" exec "$NAME" id -un) (uid $uid)"; [[ $uid != 0 ]]
"${PODMAN[@]}" exec "$NAME" python -c '
import importlib.metadata as md, torch
bad = sorted(n for n in (d.metadata["Name"] for d in md.distributions())
             if n.lower().startswith(("nvidia-", "triton")) and n.lower() != "nvidia-ml-py")  # NVML bindings (bentoml), no CUDA
print(f"   torch {torch.__version__} cuda={torch.version.cuda} nvidia/triton wheels: {bad or None}")
assert torch.version.cuda is None and not bad'
"${PODMAN[@]}" exec "$NAME" env | grep -E '^(BENTOML_DO_NOT_TRACK|DO_NOT_TRACK|MLFLOW_DISABLE_TELEMETRY)=' | sed 's/^/   env: /'
post_check "$URL" | check_answer fallback
"${PODMAN[@]}" logs "$NAME" 2>&1 | grep -E 'falling back|agreelens: serving' | sed 's/^/   log: /' | cut -c1-200 || true
took "6. checks" "$t"

t=$(now)
"${PODMAN[@]}" rm -f -t 10 "$NAME" 2> >(grep -v 'systemd connection' >&2) >/dev/null
CONTAINERS=()
took "7. stop + remove" "$t"

# ------------------------------------------------------------------------------------------ 8. registry (optional)
if [[ ${CONTAINER_TEST_REGISTRY:-0} == 1 ]]; then
  t=$(now)
  reg=$(mktemp -d "$STATE/registry.XXXXXX")
  MLPORT=$(free_port)
  echo "MLflow server on 127.0.0.1:$MLPORT (store $reg)"
  setsid env MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true "$VENV/bin/mlflow" server --host 127.0.0.1 \
    --port "$MLPORT" --workers 1 --backend-store-uri "sqlite:///$reg/mlflow.db" \
    --artifacts-destination "$reg/artifacts" >"$reg/server.log" 2>&1 &
  MLFLOW_PID=$!
  for ((i = 0; i < 120; i++)); do [[ $(get "http://127.0.0.1:$MLPORT/health") == 200 ]] && break; sleep 1; done
  [[ $(get "http://127.0.0.1:$MLPORT/health") == 200 ]] || { tail -n 30 "$reg/server.log" >&2; exit 1; }
  (cd "$reg" && MLFLOW_TRACKING_URI=http://127.0.0.1:$MLPORT PYTHONPATH=$REPO "${NICE[@]}" "$VENV/bin/python" -c "
from agreelens.registry import register
d = register('$REPO/models/large', 'agreelens-large', {'test_ppl': 1.0, 'na_accuracy': 1.0})
print(f'   registered {d.name} version {d.version} as @{d.alias}')" 2>&1 | grep -E '^   registered|Error' )
  took "8a. MLflow server + register" "$t"
  t=$(now)
  RPORT=$(free_port)
  RNAME=$NAME-registry
  CONTAINERS+=("$RNAME")
  "${PODMAN[@]}" run -d --name "$RNAME" "${LIMITS[@]}" --health-interval disable --network host \
    -e MLFLOW_TRACKING_URI="http://127.0.0.1:$MLPORT" -e AGREELENS_SERVICE_MODEL="models:/agreelens-large@champion" \
    "$IMAGE" bentoml serve services.service:AgreeLens --host 127.0.0.1 --port "$RPORT" \
    2> >(grep -v 'systemd connection' >&2) >/dev/null
  wait_ready "$RNAME" "http://127.0.0.1:$RPORT/readyz"
  post_check "http://127.0.0.1:$RPORT" | check_answer registry
  if "${PODMAN[@]}" logs "$RNAME" 2>&1 | grep -E 'unavailable|falling back'; then
    echo "error: the registry model was not loaded (fallback above)" >&2; exit 1
  fi
  fetched=$("${PODMAN[@]}" exec "$RNAME" find /tmp -path '/tmp/agreelens-registry-*' -name model.safetensors 2>/dev/null || true)
  echo "   model fetched from the registry: ${fetched:-none}"
  [[ -n $fetched ]]
  "${PODMAN[@]}" logs "$RNAME" 2>&1 | grep -E 'falling back|agreelens: serving' | sed 's/^/   log: /' | cut -c1-200 || true
  "${PODMAN[@]}" rm -f -t 10 "$RNAME" 2> >(grep -v 'systemd connection' >&2) >/dev/null
  CONTAINERS=()
  kill -- "-$MLFLOW_PID" 2>/dev/null || true
  MLFLOW_PID=""
  rm -rf "$reg"
  took "8b. registry model: start+check" "$t"
  # a registry that refuses connections (the server just stopped): the start falls back to the baked model
  t=$(now)
  DNAME=$NAME-deadregistry
  CONTAINERS+=("$DNAME")
  "${PODMAN[@]}" run -d --name "$DNAME" "${LIMITS[@]}" --health-interval disable --network host \
    -e MLFLOW_TRACKING_URI="http://127.0.0.1:$MLPORT" "$IMAGE" \
    bentoml serve services.service:AgreeLens --host 127.0.0.1 --port "$RPORT" \
    2> >(grep -v 'systemd connection' >&2) >/dev/null
  wait_ready "$DNAME" "http://127.0.0.1:$RPORT/readyz"
  post_check "http://127.0.0.1:$RPORT" | check_answer fallback
  "${PODMAN[@]}" logs "$DNAME" 2>&1 | grep -E 'could not be loaded' | sed 's/^/   log: /' | cut -c1-200 | grep .
  "${PODMAN[@]}" rm -f -t 10 "$DNAME" 2> >(grep -v 'systemd connection' >&2) >/dev/null
  CONTAINERS=()
  took "8c. registry down: fallback+check" "$t"
fi

# ------------------------------------------------------------------------------------------ worker (optional)
if [[ ${CONTAINER_TARGET:-service} == worker ]]; then
  t=$(now)
  build worker "$WORKER_IMAGE"
  took "4w. build worker image" "$t"
  WSIZE=$("${PODMAN[@]}" image inspect -f '{{.Size}}' "$WORKER_IMAGE")
  TIMES+=("$(printf '%-34s %8s MB' "   worker image size" "$(awk -v s="$WSIZE" 'BEGIN { printf "%.0f", s/1e6 }')")")
  t=$(now)
  out=$("${PODMAN[@]}" run --rm "${LIMITS[@]}" "$WORKER_IMAGE" --help)
  grep -q 'Usage: agreelens' <<<"$out"
  echo "   agreelens --help: $(grep -c '│ [a-z]' <<<"$out") command lines"
  echo "   dvc --version: $("${PODMAN[@]}" run --rm "${LIMITS[@]}" "$WORKER_IMAGE" dvc --version)"
  "${PODMAN[@]}" run --rm "${LIMITS[@]}" "$WORKER_IMAGE" pipeline --help | grep -q -- '--profile'
  echo "   pipeline --help (python flows/pipeline.py): ok"
  "${PODMAN[@]}" run --rm "${LIMITS[@]}" "$WORKER_IMAGE" python -c '
import importlib.metadata as md, os, torch
bad = sorted(n for n in (d.metadata["Name"] for d in md.distributions())
             if n.lower().startswith(("nvidia-", "triton")) and n.lower() != "nvidia-ml-py")
print(f"   uid {os.getuid()}, torch {torch.__version__} cuda={torch.version.cuda}, nvidia/triton wheels: {bad or None}")
assert os.getuid() != 0 and torch.version.cuda is None and not bad'
  took "6w. worker: --help, dvc, pipeline" "$t"
fi
