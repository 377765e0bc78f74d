# shellcheck shell=bash
# Sourced by every configs/*.sh (and launch/head.sh). It picks the Python environment, fixes Ray's
# auth mode, attaches to a cluster (RAY_ADDRESS) or starts a local head it alone stops, checks that
# the cluster can hold the job, and submits one nla-universal stage: `submit STAGE key=value ...`.
#
# Environment (all optional):
#   RAY_ADDRESS        dashboard URL of a running cluster (http://HEAD:8265); unset = a local head
#   RAY_AUTH_MODE      token | disabled; unset = token when a token exists, disabled for a local head
#   RUN_DIR POOL DEVICE  the run folder (on storage every node sees), pool, torch device
#   NUM_GPUS           GPUs the stage needs from the cluster (checked before anything starts)
#   NUM_CPUS           CPUs reserved for the job's driver        ENTRYPOINT_NUM_GPUS  GPUs reserved for it
#   HEAD_NUM_CPUS HEAD_NUM_GPUS  what a local head offers (default: this machine's)
#   RAY_TEMP_DIR       a local head's Ray folder (default RUN_DIR/ray: its logs stay with the run)
#   RAY_HEAD_PORT RAY_DASHBOARD_PORT  a local head's ports (default: free ones)
#   NLA_PYTHON         the Python environment (default: the active virtualenv, else the repo's .venv)
#   JOB_PYTHON         interpreter on the head (default: NLA_PYTHON for a local head, `python` on a cluster)
#   UPLOAD_REPO        auto | yes | no: send the repo as the job's working dir (auto: only when the
#                      local head's Python lacks the package)
#   FORWARD_ENV        names of variables the job gets when they are set here
#   RAY_CHECK_TIMEOUT_S  deadline of each check against the cluster (default 60)
#   SUBMIT_MODULE      run `python -m SUBMIT_MODULE FLAGS` instead of the CLI stage (the Miles driver);
#                      the stage name then only names the job
set -euo pipefail

NLA_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Every error names the problem and its fix, and stops before any work (status 2, like the CLI).
die() {
  printf 'error: %s\n' "$1" >&2
  [[ -z "${2:-}" ]] || printf '  fix: %s\n' "$2" >&2
  exit 2
}

# The head runs the job's `python`, so the head and the submitter must share one environment: pick it once.
pick_python() {
  local py="${NLA_PYTHON:-}"
  if [[ -z "$py" && -n "${VIRTUAL_ENV:-}" ]]; then py="$VIRTUAL_ENV/bin/python"; fi
  if [[ -z "$py" && -x "$NLA_REPO/.venv/bin/python" ]]; then py="$NLA_REPO/.venv/bin/python"; fi
  if [[ -z "$py" ]]; then py="$(command -v python3 || true)"; fi
  [[ -n "$py" && -x "$py" ]] || die "no Python environment found (NLA_PYTHON='${NLA_PYTHON:-}')" \
    "run \`make install\` in $NLA_REPO, or export NLA_PYTHON=/path/to/venv/bin/python"
  PYTHON="$py"
  RAY_BIN="$(dirname "$PYTHON")/ray"
  [[ -x "$RAY_BIN" ]] || die "no \`ray\` command beside $PYTHON" "$PYTHON -m pip install 'ray[default]'"
  (cd / && "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ("ray", "aiohttp", "grpc"))))') ||
    die "$PYTHON has Ray without its job API (ray job submit needs ray[default])" "$PYTHON -m pip install 'ray[default]'"
}

# A path the job on the head can open whatever its working directory.
abs_path() { realpath -m -- "$1"; }

# Resource counts may be fractional (Ray's own units), so compare them as numbers, not in bash.
num_le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 <= b + 0) }'; }

# A resource count from the environment must be a plain number before anything compares it.
check_count() {
  [[ "$2" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "$1=$2 is not a number" "export $1 as a count, e.g. $1=1"
}

# Ray 2.60's `ray start --head` silently turns token auth on whenever a token file exists (any local
# ray.init() writes ~/.ray/auth_token), after which a submitter without RAY_AUTH_MODE=token fails
# with "Missing authentication token". One explicit mode, exported to both the head we start and
# every ray command, removes that dependence on the machine's history. Without a token, auth is
# disabled only for a head we start ourselves (its dashboard is on loopback; see launch/README.md
# for what stays exposed); a remote cluster without a token here is an error, not a guess.
resolve_auth_mode() {
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
    die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty" "point it at the head's token file, or unset it"
  fi
  if [[ -n "${RAY_AUTH_MODE:-}" ]]; then
    [[ "$RAY_AUTH_MODE" == token || "$RAY_AUTH_MODE" == disabled ]] ||
      die "RAY_AUTH_MODE=$RAY_AUTH_MODE is not a mode Ray knows" "export RAY_AUTH_MODE=token (or disabled on an isolated machine)"
  elif [[ -n "${RAY_AUTH_TOKEN:-}" || -n "${RAY_AUTH_TOKEN_PATH:-}" || -s "$HOME/.ray/auth_token" ]]; then
    RAY_AUTH_MODE=token
  elif [[ -z "${RAY_ADDRESS:-}" ]]; then
    RAY_AUTH_MODE=disabled
  else
    die "no Ray auth token here for the cluster at $RAY_ADDRESS" \
      "copy the head's ~/.ray/auth_token to $HOME/.ray/auth_token (or export RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH); if that cluster really runs without auth, export RAY_AUTH_MODE=disabled"
  fi
  export RAY_AUTH_MODE
}

# What a local head offers: Ray would detect GPUs itself, but an explicit count lets an over-large
# request fail before the head starts.
local_gpu_count() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
    local ids="${CUDA_VISIBLE_DEVICES//[[:space:]]/}"
    if [[ -z "$ids" ]]; then echo 0; else awk -F, '{print NF}' <<<"$ids"; fi
  elif command -v nvidia-smi >/dev/null; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# The state file of a local head: what launch/head.sh stop and the tests read to stop or check it.
head_state_file() { echo "$RUN_DIR/ray-head.env"; }

# Processes of one local head: those carrying the marker variable only that head inherits, and
# their descendants (a process that rewrites its title, like Ray's workers and dashboard modules,
# loses the marker from /proc/PID/environ but stays a child). Nothing else on the node is touched.
head_pids() {
  local roots
  roots="$({ grep -lzxF "NLA_RAY_HEAD=$1" /proc/[0-9]*/environ 2>/dev/null || true; } | cut -d/ -f3)"
  [[ -n "$roots" ]] || return 0
  ps -eo pid=,ppid=,stat= | awk -v roots="$roots" '
    BEGIN { n = split(roots, r, "\n"); for (i = 1; i <= n; i++) ours[r[i]] = 1 }
    $3 !~ /^Z/ { parent[$1] = $2 }
    END {
      do { added = 0; for (p in parent) if (!(p in ours) && (parent[p] in ours)) { ours[p] = 1; added = 1 } } while (added)
      for (p in ours) if (p in parent) print p
    }' | sort -n
}

# Those of PIDS that still belong to head ID (a PID that exited and was reused is not ours).
ours() {
  local id="$1"
  shift
  comm -12 <(printf '%s\n' "$@" | sort) <(head_pids "$id" | sort)
}

# SIGTERM head ID's processes among PIDS and wait up to SECONDS for them to go.
term_and_wait() {
  local id="$1" seconds="$2" targets i
  shift 2
  mapfile -t targets < <(ours "$id" "$@")
  ((${#targets[@]} > 0)) || return 0
  kill -TERM "${targets[@]}" 2>/dev/null || true
  for ((i = 0; i < seconds * 10; i++)); do
    [[ -n "$(ours "$id" "${targets[@]}")" ]] || return 0
    sleep 0.1
  done
}

# Stop one local head in Ray's own order (the raylet first, the GCS that the others report to
# last), then SIGKILL whatever of it is left. Only that head's processes (head_pids) are touched.
stop_head_id() {
  local id="$1" pid comm first=() rest=() last=()
  for pid in $(head_pids "$id"); do
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || continue
    case "$comm" in
      raylet) first+=("$pid") ;;
      gcs_server) last+=("$pid") ;;
      *) rest+=("$pid") ;;
    esac
  done
  term_and_wait "$id" 10 "${first[@]}"
  term_and_wait "$id" 10 "${rest[@]}"
  term_and_wait "$id" 10 "${last[@]}"
  mapfile -t rest < <(head_pids "$id")
  ((${#rest[@]} == 0)) || kill -KILL "${rest[@]}" 2>/dev/null || true
}

# Free TCP ports for a local head, so it never collides with another head on the same node.
free_ports() {
  "$PYTHON" -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

# Start a local head from the job's own Python, recording its marker, ports and PIDs in the state
# file; it is stopped by stop_local_head (on exit of the launcher, or by launch/head.sh stop).
start_local_head() {
  local state id temp gcs_port dash_port client_port agent_port autoscaler_metrics dashboard_metrics log
  state="$(head_state_file)"
  if [[ -f "$state" ]]; then
    id="$(sed -n 's/^HEAD_ID=//p' "$state")"
    [[ -z "$id" || -z "$(head_pids "$id")" ]] ||
      die "a Ray head started for $RUN_DIR is still running ($state)" \
        "attach to it with RAY_ADDRESS=$(sed -n 's/^RAY_ADDRESS=//p' "$state"), or stop it: $NLA_REPO/launch/head.sh stop"
  fi
  num_le "$NUM_GPUS" "$HEAD_NUM_GPUS" ||
    die "the stage asks for NUM_GPUS=$NUM_GPUS but this machine offers $HEAD_NUM_GPUS GPU(s)" \
      "set NUM_GPUS=$HEAD_NUM_GPUS, or submit to a cluster with RAY_ADDRESS=http://HEAD:8265"
  num_le "$NUM_CPUS" "$HEAD_NUM_CPUS" ||
    die "the job asks for NUM_CPUS=$NUM_CPUS but the local head has HEAD_NUM_CPUS=$HEAD_NUM_CPUS" "lower NUM_CPUS or raise HEAD_NUM_CPUS"
  id="$(date +%s)-$$-$RANDOM"
  temp="${RAY_TEMP_DIR:-$RUN_DIR/ray}"
  # Ray puts AF_UNIX sockets (at most 107 bytes) at TEMP/session_<date>_<pid>/sockets/plasma_store.
  if ((${#temp} > 40)) && [[ -z "${RAY_TEMP_DIR:-}" ]]; then
    temp="$(mktemp -d /tmp/nla-ray-XXXXXX)"
  fi
  ((${#temp} <= 40)) || die "RAY_TEMP_DIR=$temp is too long for Ray's socket paths (over 40 characters)" "export a shorter RAY_TEMP_DIR, e.g. /tmp/ray-\$USER"
  mkdir -p "$RUN_DIR" "$temp"
  read -r gcs_port dash_port client_port agent_port autoscaler_metrics dashboard_metrics <<<"$(free_ports 6)"
  gcs_port="${RAY_HEAD_PORT:-$gcs_port}"
  dash_port="${RAY_DASHBOARD_PORT:-$dash_port}"
  log="$RUN_DIR/ray-head.log"
  # Recorded before the start, so that an interrupted start is stopped too (on exit, or by head.sh stop).
  LOCAL_HEAD_ID="$id"
  printf 'HEAD_ID=%s\nRAY_TEMP_DIR=%s\nRAY_AUTH_MODE=%s\nRAY_ADDRESS=http://127.0.0.1:%s\nGCS_ADDRESS=127.0.0.1:%s\n' \
    "$id" "$temp" "$RAY_AUTH_MODE" "$dash_port" "$gcs_port" >"$state"
  echo "starting a local Ray head ($HEAD_NUM_CPUS CPU, $HEAD_NUM_GPUS GPU, auth $RAY_AUTH_MODE, Ray folder $temp)" >&2
  # In the background, like the submission, so that a TERM during the start reaches the trap.
  # The two metrics ports are fixed by default (44217, 44227) and would collide with another head.
  (cd "$NLA_REPO" && NLA_RAY_HEAD="$id" PATH="$(dirname "$PYTHON"):$PATH" AUTOSCALER_METRIC_PORT="$autoscaler_metrics" \
    DASHBOARD_METRIC_PORT="$dashboard_metrics" timeout "${HEAD_START_TIMEOUT_S:-120}" \
    "$RAY_BIN" start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 \
    --port "$gcs_port" --dashboard-port "$dash_port" --ray-client-server-port "$client_port" \
    --dashboard-agent-listen-port "$agent_port" --num-cpus "$HEAD_NUM_CPUS" --num-gpus "$HEAD_NUM_GPUS" \
    --disable-usage-stats --temp-dir "$temp" >"$log" 2>&1) &
  if ! wait $!; then
    tail -n 15 "$log" >&2
    die "the local Ray head did not start (log: $log)" "read the log above; a port in use: export RAY_HEAD_PORT / RAY_DASHBOARD_PORT"
  fi
  RAY_ADDRESS="http://127.0.0.1:$dash_port"
  export RAY_ADDRESS
  RAY_TEMP_DIR="$temp"
  printf 'PIDS="%s"\nSTARTED_AT=%s\n' "$(head_pids "$id" | tr '\n' ' ' | sed 's/ $//')" "$(date -Is)" >>"$state"
  # A Ray folder outside the run gets a link from RUN_DIR/ray, so the run's logs are found in one place.
  if [[ "$temp" != "$RUN_DIR/ray" && (-L "$RUN_DIR/ray" || ! -e "$RUN_DIR/ray") ]]; then ln -sfn "$temp" "$RUN_DIR/ray"; fi
}

# Stop the local head ID (default: the one recorded in RUN_DIR's state file) and mark the record.
stop_local_head() {
  local state id
  state="$(head_state_file)"
  id="${1:-}"
  [[ -n "$id" || ! -f "$state" ]] || id="$(sed -n 's/^HEAD_ID=//p' "$state")"
  [[ -n "$id" ]] || return 0
  stop_head_id "$id"
  if grep -qxF "HEAD_ID=$id" "$state" 2>/dev/null && ! grep -q '^STOPPED_AT=' "$state"; then
    echo "STOPPED_AT=$(date -Is)" >>"$state"
  fi
}

# Reachability, auth and size of the cluster, from the jobs API the submission itself will use:
# a dead address or a missing token fails here in seconds instead of after a long ray job submit.
check_cluster() {
  local out rc cpus gpus nodes
  rc=0
  out="$(cd / && timeout "${RAY_CHECK_TIMEOUT_S:-60}" "$PYTHON" - "$RAY_ADDRESS" 2>&1 <<'EOF'
import sys
from ray.util.state import list_nodes
try:
    nodes = [n for n in list_nodes(address=sys.argv[1], limit=10000, detail=True, raise_on_missing_output=False)
             if n.state == "ALIVE"]
except Exception as exc:  # every failure here is reported the same way: the message, one line
    print(f"CHECK-FAILED {type(exc).__name__}: {' '.join(str(exc).split())[:400]}")
    sys.exit(3)
total = lambda key: sum(n.resources_total.get(key, 0) for n in nodes)
print(f"RESOURCES {total('CPU'):g} {total('GPU'):g} {len(nodes)}")
EOF
  )" || rc=$?
  if ((rc == 124)); then
    die "the Ray cluster at $RAY_ADDRESS did not answer within ${RAY_CHECK_TIMEOUT_S:-60} s" \
      "check the address (the head's dashboard URL, http://HEAD:8265) and that the head is up: ray status on the head"
  fi
  if [[ "$out" != *"RESOURCES "* ]]; then
    out="$(grep -m1 'CHECK-FAILED' <<<"$out" || tail -n 3 <<<"$out")"
    if [[ "$out" == *uthenticat* || "$out" == *nauthorized* ]]; then
      die "the Ray cluster at $RAY_ADDRESS refused this client's auth (RAY_AUTH_MODE=$RAY_AUTH_MODE): ${out#CHECK-FAILED }" \
        "use the head's token: copy its ~/.ray/auth_token here or export RAY_AUTH_TOKEN, with RAY_AUTH_MODE=token"
    fi
    die "no Ray cluster reachable at RAY_ADDRESS=$RAY_ADDRESS: ${out#CHECK-FAILED }" \
      "start one (ray start --head on the head node, see launch/cluster-example.md) or unset RAY_ADDRESS to start a local head"
  fi
  read -r cpus gpus nodes <<<"$(sed -n 's/^RESOURCES //p' <<<"$out")"
  echo "cluster at $RAY_ADDRESS: $nodes node(s), $cpus CPU, $gpus GPU" >&2
  num_le "$NUM_GPUS" "$gpus" ||
    die "the stage asks for NUM_GPUS=$NUM_GPUS but the cluster at $RAY_ADDRESS has $gpus GPU(s)" \
      "set NUM_GPUS=$gpus, or add GPU nodes: ray start --address HEAD:6379 --num-gpus N on each"
  num_le "$NUM_CPUS" "$cpus" ||
    die "the job asks for NUM_CPUS=$NUM_CPUS but the cluster at $RAY_ADDRESS has $cpus CPU(s)" "lower NUM_CPUS"
}

# The job's environment: only named, set variables (never secrets: the runtime env shows in `ray
# job list` and the dashboard; give a key to the head's own environment instead).
job_runtime_env() {
  local names
  read -ra names <<<"${FORWARD_ENV:-NLA_UNIVERSAL_CACHE HF_HUB_OFFLINE HF_HOME}"
  PYTHONUNBUFFERED=1 "$PYTHON" -c '
import json, os, sys
print(json.dumps({"env_vars": {k: os.environ[k] for k in sys.argv[1:] if os.environ.get(k)}}))' \
    PYTHONUNBUFFERED "${names[@]}"
}

# The job imports nla_universal from the head's Python; upload the repo only when that Python lacks
# it. A cluster's Python cannot be asked from here: there, auto means installed (see UPLOAD_REPO).
wants_working_dir() {
  local local_head="$1"
  case "${UPLOAD_REPO:-auto}" in
    yes) return 0 ;;
    no) return 1 ;;
    auto) [[ -n "$local_head" ]] && (cd / && "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("nla_universal") is not None)') ;;
    *) die "UPLOAD_REPO=$UPLOAD_REPO is not auto, yes or no" "export UPLOAD_REPO=auto" ;;
  esac
}

# The submitted job's status from the jobs API (what `ray job status` prints, without its formatting).
job_status() {
  (cd / && timeout "${RAY_CHECK_TIMEOUT_S:-60}" "$PYTHON" -c '
import sys
from ray.job_submission import JobSubmissionClient
print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)' "$RAY_ADDRESS" "$JOB_ID" 2>/dev/null) || true
}

# Stop what this launcher started (the local head) on any exit; a cluster's job is left to the cluster.
on_exit() {
  local rc=$?
  [[ -z "${SUBMIT_PID:-}" ]] || kill -TERM "$SUBMIT_PID" 2>/dev/null || true
  if [[ -n "${LOCAL_HEAD_ID:-}" ]]; then
    echo "stopping the local Ray head" >&2
    stop_local_head "$LOCAL_HEAD_ID"
  elif [[ -n "${JOB_ID:-}" && -z "${JOB_DONE:-}" ]]; then
    echo "the job $JOB_ID keeps running on $RAY_ADDRESS; stop it with: $RAY_BIN job stop --address $RAY_ADDRESS $JOB_ID" >&2
  fi
  exit "$rc"
}

# Bash only runs the EXIT trap on a signal it handles, so turn INT/TERM into an ordinary exit.
trap 'exit 130' INT
trap 'exit 143' TERM
trap on_exit EXIT

# Attach to RAY_ADDRESS or start a local head, then check that the cluster can hold the job.
prepare_cluster() {
  resolve_auth_mode
  if [[ -n "${RAY_ADDRESS:-}" ]]; then
    [[ "$RAY_ADDRESS" == http://* || "$RAY_ADDRESS" == https://* ]] ||
      die "RAY_ADDRESS=$RAY_ADDRESS is not the dashboard URL ray job submit needs" "export RAY_ADDRESS=http://HEAD:8265 (the head's dashboard port, not the GCS port 6379)"
  else
    start_local_head
  fi
  check_cluster
}

# Submit `nla-universal STAGE ARGS...` as a Ray job, follow its logs, and return 0 only if it
# SUCCEEDED. With DRY_RUN=1 it only prints the `ray job submit` command line, touching no cluster.
submit() {
  local stage="$1" status log_hint local_head=
  shift
  [[ -n "${RAY_ADDRESS:-}" ]] || local_head=1
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    resolve_auth_mode
    RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:PORT}"
  else
    prepare_cluster
  fi
  JOB_ID="${SUBMISSION_ID:-nla-$stage-$(date +%Y%m%d-%H%M%S)-$$}"
  local cmd=("$RAY_BIN" job submit --address "$RAY_ADDRESS" --submission-id "$JOB_ID"
    --runtime-env-json "$(job_runtime_env)" --entrypoint-num-cpus "$NUM_CPUS" --entrypoint-num-gpus "$ENTRYPOINT_NUM_GPUS")
  if wants_working_dir "$local_head"; then cmd+=(--working-dir "$NLA_REPO"); fi
  local job_python="${JOB_PYTHON:-python}"
  [[ -z "$local_head" ]] || job_python="${JOB_PYTHON:-$PYTHON}"
  # The CLI takes the stage as its first argument; another module (SUBMIT_MODULE) gets only the flags.
  if [[ -n "${SUBMIT_MODULE:-}" ]]; then
    cmd+=(-- "$job_python" -m "$SUBMIT_MODULE" "$@")
  else
    cmd+=(-- "$job_python" -m nla_universal.cli "$stage" "$@")
  fi
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    JOB_DONE=1
    printf '%q ' "${cmd[@]}"
    echo
    return 0
  fi
  echo "submitting $stage as job $JOB_ID to $RAY_ADDRESS" >&2
  # In the background so that a TERM reaches the trap at once instead of after the job.
  "${cmd[@]}" &
  SUBMIT_PID=$!
  wait "$SUBMIT_PID" || true
  SUBMIT_PID=
  status="$(job_status)"
  JOB_DONE=1
  log_hint="$RAY_BIN job logs --address $RAY_ADDRESS $JOB_ID"
  [[ -z "${LOCAL_HEAD_ID:-}" ]] || log_hint="$RAY_TEMP_DIR/session_latest/logs/job-driver-$JOB_ID.log"
  if [[ "$status" == SUCCEEDED ]]; then
    echo "job $JOB_ID SUCCEEDED; logs: $log_hint" >&2
    return 0
  fi
  echo "error: job $JOB_ID ended ${status:-with an unknown status}; logs: $log_hint" >&2
  if timeout "${RAY_CHECK_TIMEOUT_S:-60}" "$RAY_BIN" job logs --address "$RAY_ADDRESS" "$JOB_ID" 2>/dev/null |
    grep -q "No module named 'nla_universal'"; then
    echo "  fix: the head's Python lacks nla_universal: install the package there, or export UPLOAD_REPO=yes to send the repo" >&2
  fi
  return 1
}

pick_python
RUN_DIR="$(abs_path "${RUN_DIR:-runs/demo}")"
POOL="${POOL:-demo}"
if [[ "$POOL" == */* || "$POOL" == *.yaml || "$POOL" == *.yml ]]; then POOL="$(abs_path "$POOL")"; fi
NUM_GPUS="${NUM_GPUS:-0}"
NUM_CPUS="${NUM_CPUS:-1}"
ENTRYPOINT_NUM_GPUS="${ENTRYPOINT_NUM_GPUS:-$NUM_GPUS}"
HEAD_NUM_CPUS="${HEAD_NUM_CPUS:-$(nproc)}"
[[ -n "${RAY_ADDRESS:-}" ]] || HEAD_NUM_GPUS="${HEAD_NUM_GPUS:-$(local_gpu_count)}"
for var in NUM_GPUS NUM_CPUS ENTRYPOINT_NUM_GPUS HEAD_NUM_CPUS ${HEAD_NUM_GPUS:+HEAD_NUM_GPUS}; do check_count "$var" "${!var}"; done
if num_le "$NUM_GPUS" 0; then DEVICE="${DEVICE:-cpu}"; else DEVICE="${DEVICE:-cuda}"; fi
