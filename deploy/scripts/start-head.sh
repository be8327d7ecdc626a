#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# start-head.sh: the platform's head node. Starts the Ray head (dashboard, metrics export),
# checks Redis, then runs the sparkgrid scheduler (`sparkgrid head`: the client API, and the
# worker link for node operators outside the cluster) in the foreground of this script.
# SIGTERM or Ctrl-C stops the scheduler first (running streams get up to 10 s), then Ray.
# Meant to be run by systemd (deploy/systemd/sparkgrid-head.service), a container
# (deploy/docker/Dockerfile.head) or a KubeRay head pod; fine by hand too.
#
# Settings (environment variables; defaults in brackets):
#   SPARKGRID_REDIS_URL         Redis of jobs, keys and the ledger, e.g.
#                               redis://:PASSWORD@127.0.0.1:6380/0 (required, or:)
#   SPARKGRID_REDIS_URL_FILE    a file holding that URL (keeps the password out of the env)
#   SPARKGRID_REDIS_WAIT_S      how long to wait for Redis to answer [30]
#   SPARKGRID_JOIN_RAY          HOST:PORT of a Ray head that already runs: start no Ray here,
#                               only one more scheduler on the same Redis (several schedulers
#                               behind one address, rolling restarts: deploy/README.md) []
#   SPARKGRID_NODE_IP           this node's private address, e.g. its WireGuard address
#                               (Ray's --node-ip-address) [Ray's guess: the default route's]
#   SPARKGRID_RAY_PORT          Ray's GCS port, the address workers join [6379]
#   SPARKGRID_DASHBOARD_HOST    where the Ray dashboard listens [SPARKGRID_NODE_IP, else 0.0.0.0]
#   SPARKGRID_DASHBOARD_PORT    [8265]
#   SPARKGRID_RAY_METRICS_PORT  Ray's Prometheus endpoint on this node [8080]
#   SPARKGRID_RAY_EXTRA_ARGS    more `ray start` options, space-separated []
#   SPARKGRID_RAY_WAIT_S        how long Ray may take to start [60]
#   SPARKGRID_GRPC_HOST         where the scheduler's gRPC API listens [0.0.0.0]
#   SPARKGRID_GRPC_PORT         [50051]
#   SPARKGRID_METRICS_PORT      the scheduler's Prometheus /metrics port [9464]
#   SPARKGRID_TLS_CERT, SPARKGRID_TLS_KEY   PEM files: serve the API over TLS only []
#   SPARKGRID_WORKER_LINK_PORT  the worker link: where node operators outside the Ray cluster
#                               dial in (`sparkgrid worker --join`), on SPARKGRID_GRPC_HOST;
#                               empty or "off": no link [50060]
#   SPARKGRID_WORKER_LINK_CERT, SPARKGRID_WORKER_LINK_KEY   PEM files: the link's TLS
#                               [the API's SPARKGRID_TLS_CERT/KEY; with neither the head
#                               refuses to start the link, unless:]
#   SPARKGRID_WORKER_LINK_PLAINTEXT   1: serve the link without TLS, operator tokens in the
#                               clear (a private network only) [0]
#   SPARKGRID_ALLOW_UNREGISTERED    1: also route to Ray workers that no operator token
#                               registered (a cluster whose every member is the platform's) [0]
#   SPARKGRID_PRICES            the price book (TOML) [the shipped scheduler/prices.toml]
#   SPARKGRID_ROUTING           how the scheduler picks a worker: fastest, round_robin, jsq, p2c
#                               [fastest] (SPARKGRID_POLICY, its old name, is still read)
#   SPARKGRID_HEAD_EXTRA_ARGS   more `sparkgrid head` options, space-separated []
#   SPARKGRID_VENV              the virtual environment sparkgrid is installed in [PATH's]
#   SPARKGRID_PYTHON            the Python sparkgrid is installed in [the `sparkgrid` command's]
#   RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN    the cluster's Ray token [~/.ray/auth_token,
#                               generated on first start when there is none]
#   RAY_PROMETHEUS_HOST         Prometheus URL for the dashboard's Metrics page, e.g.
#                               http://127.0.0.1:9090 (read by Ray itself) []
set -euo pipefail

SG_ROLE="head"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sg_install_traps
sg_require_token_auth

node_ip=${SPARKGRID_NODE_IP:-}
ray_port=${SPARKGRID_RAY_PORT:-6379}
dashboard_host=${SPARKGRID_DASHBOARD_HOST:-${node_ip:-0.0.0.0}}
dashboard_port=${SPARKGRID_DASHBOARD_PORT:-8265}
ray_metrics_port=${SPARKGRID_RAY_METRICS_PORT:-8080}
ray_wait_s=${SPARKGRID_RAY_WAIT_S:-60}
redis_wait_s=${SPARKGRID_REDIS_WAIT_S:-30}
grpc_host=${SPARKGRID_GRPC_HOST:-0.0.0.0}
grpc_port=${SPARKGRID_GRPC_PORT:-50051}
metrics_port=${SPARKGRID_METRICS_PORT:-9464}
tls_cert=${SPARKGRID_TLS_CERT:-}
tls_key=${SPARKGRID_TLS_KEY:-}
prices=${SPARKGRID_PRICES:-}
link_port=${SPARKGRID_WORKER_LINK_PORT-50060}  # set and empty: no link
link_cert=${SPARKGRID_WORKER_LINK_CERT:-}
link_key=${SPARKGRID_WORKER_LINK_KEY:-}
link_plaintext=${SPARKGRID_WORKER_LINK_PLAINTEXT:-0}
allow_unregistered=${SPARKGRID_ALLOW_UNREGISTERED:-0}
policy=${SPARKGRID_ROUTING:-${SPARKGRID_POLICY:-fastest}}

# -- check everything before starting anything ------------------------------------------------
sg_require_port SPARKGRID_RAY_PORT "$ray_port"
sg_require_port SPARKGRID_DASHBOARD_PORT "$dashboard_port"
sg_require_port SPARKGRID_RAY_METRICS_PORT "$ray_metrics_port"
sg_require_port SPARKGRID_GRPC_PORT "$grpc_port"
sg_require_port SPARKGRID_METRICS_PORT "$metrics_port"
sg_require_uint SPARKGRID_RAY_WAIT_S "$ray_wait_s"
sg_require_uint SPARKGRID_REDIS_WAIT_S "$redis_wait_s"
case $policy in
fastest | round_robin | jsq | p2c) ;;
*) sg_die "SPARKGRID_ROUTING: expected fastest, round_robin, jsq or p2c, got '$policy'" ;;
esac
if [[ -n $tls_cert || -n $tls_key ]]; then
    [[ -n $tls_cert && -n $tls_key ]] || sg_die "SPARKGRID_TLS_CERT and SPARKGRID_TLS_KEY go together: set both or neither"
    [[ -r $tls_cert ]] || sg_die "SPARKGRID_TLS_CERT=$tls_cert is not a readable file"
    [[ -r $tls_key ]] || sg_die "SPARKGRID_TLS_KEY=$tls_key is not a readable file"
fi
if [[ -n $prices && ! -r $prices ]]; then
    sg_die "SPARKGRID_PRICES=$prices is not a readable file (the price book, TOML)"
fi
sg_require_flag SPARKGRID_ALLOW_UNREGISTERED "$allow_unregistered"
sg_require_flag SPARKGRID_WORKER_LINK_PLAINTEXT "$link_plaintext"
if [[ $link_port == off ]]; then
    link_port=
fi
if [[ -n $link_port ]]; then
    sg_require_port SPARKGRID_WORKER_LINK_PORT "$link_port"
    [[ $link_port != "$grpc_port" && $link_port != "$metrics_port" ]] ||
        sg_die "SPARKGRID_WORKER_LINK_PORT=$link_port: the API or its metrics have that port; give the link its own (50060)"
    if [[ -n $link_cert || -n $link_key ]]; then
        [[ -n $link_cert && -n $link_key ]] ||
            sg_die "SPARKGRID_WORKER_LINK_CERT and SPARKGRID_WORKER_LINK_KEY go together: set both or neither"
        ((!link_plaintext)) ||
            sg_die "SPARKGRID_WORKER_LINK_PLAINTEXT=1 and SPARKGRID_WORKER_LINK_CERT: choose one"
        [[ -r $link_cert ]] || sg_die "SPARKGRID_WORKER_LINK_CERT=$link_cert is not a readable file"
        [[ -r $link_key ]] || sg_die "SPARKGRID_WORKER_LINK_KEY=$link_key is not a readable file"
    elif ((!link_plaintext)); then
        # The API's certificate then serves the link too (already checked above).
        link_cert=$tls_cert
        link_key=$tls_key
        [[ -n $link_cert ]] ||
            sg_die "the worker link (SPARKGRID_WORKER_LINK_PORT=$link_port) needs TLS: operator tokens" \
                "cross the internet on it. Set SPARKGRID_WORKER_LINK_CERT and SPARKGRID_WORKER_LINK_KEY" \
                "(or the API's SPARKGRID_TLS_CERT/KEY, which the link then shares); or" \
                "SPARKGRID_WORKER_LINK_PORT=off for no link; or, on a private network only," \
                "SPARKGRID_WORKER_LINK_PLAINTEXT=1"
    fi
fi

if [[ -n ${SPARKGRID_REDIS_URL_FILE:-} ]]; then
    [[ -r $SPARKGRID_REDIS_URL_FILE ]] || sg_die "SPARKGRID_REDIS_URL_FILE=$SPARKGRID_REDIS_URL_FILE is not a readable file"
    IFS= read -r SPARKGRID_REDIS_URL <"$SPARKGRID_REDIS_URL_FILE" || true
fi
[[ -n ${SPARKGRID_REDIS_URL:-} ]] ||
    sg_die "SPARKGRID_REDIS_URL is not set: the Redis of the ledger, e.g. redis://:PASSWORD@127.0.0.1:6380/0 (see deploy/redis/redis.conf)"
[[ $SPARKGRID_REDIS_URL == redis://* || $SPARKGRID_REDIS_URL == rediss://* || $SPARKGRID_REDIS_URL == unix://* ]] ||
    sg_die "SPARKGRID_REDIS_URL: expected redis://, rediss:// or unix://"
[[ $SPARKGRID_REDIS_URL != *CHANGE-ME* ]] ||
    sg_die "SPARKGRID_REDIS_URL still has the placeholder password: set the one of requirepass in redis.conf"
# Handed to the scheduler (and the check below) in their environment alone: it shows in no
# command line, and Ray's processes, which run whatever the cluster sends them, never see it.
export -n SPARKGRID_REDIS_URL

sg_setup_path
sg_setup_ray_auth generate
if [[ -z $node_ip ]]; then
    sg_log "note: SPARKGRID_NODE_IP is not set; Ray advertises the address of the default route." \
        "Across providers set it to the head's private (WireGuard) address."
fi
if [[ -z $tls_cert && $grpc_host != 127.0.0.1 && $grpc_host != localhost ]]; then
    sg_log "note: the gRPC API is served in plaintext on $grpc_host:$grpc_port; API keys cross" \
        "the network in clear unless a TLS proxy fronts it (or set SPARKGRID_TLS_CERT/KEY)"
fi
if [[ -n $link_port && -z $link_cert && $grpc_host != 127.0.0.1 && $grpc_host != localhost ]]; then
    sg_log "warning: the worker link is served in plaintext on $grpc_host:$link_port" \
        "(SPARKGRID_WORKER_LINK_PLAINTEXT=1): operator tokens cross the network in clear"
fi

# -- Redis: answers, with the password; warn when it is not set up for a ledger ---------------
sg_log "checking Redis (up to ${redis_wait_s} s)"
waited=0
while :; do
    rc=0
    SPARKGRID_REDIS_URL=$SPARKGRID_REDIS_URL "$SPARKGRID_PYTHON" - <<'PY' || rc=$?
import os
import re
import sys

import redis

url = os.environ["SPARKGRID_REDIS_URL"]
shown = re.sub(r"//[^@/]*@", "//***@", url)
try:
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    client.ping()
except redis.AuthenticationError as err:
    print(f"error: Redis at {shown} refused the password ({err}); the URL's password must be "
          "redis.conf's requirepass", file=sys.stderr)
    sys.exit(2)
except redis.ResponseError as err:
    print(f"error: Redis at {shown}: {err}", file=sys.stderr)
    sys.exit(2)
except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
    print(f"Redis at {shown} does not answer yet ({err})", file=sys.stderr)
    sys.exit(1)
try:  # CONFIG may be renamed or denied by an ACL: then these checks are skipped
    aof = client.config_get("appendonly").get("appendonly")
    policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
except redis.RedisError:
    aof = policy = None
if aof == "no":
    print(f"warning: Redis at {shown} runs without the append-only file: a crash loses the "
          "ledger's last writes (see deploy/redis/redis.conf)", file=sys.stderr)
if policy not in (None, "noeviction"):
    print(f"warning: Redis at {shown} has maxmemory-policy {policy}: it may evict jobs and "
          "ledger keys when full; use noeviction", file=sys.stderr)
print(f"Redis at {shown} answers", file=sys.stderr)
PY
    ((SG_STOP_REQUESTED)) && exit 0
    case $rc in
    0) break ;;
    1) ;;
    *) exit 1 ;;
    esac
    ((waited < redis_wait_s)) || sg_die "Redis did not answer within ${redis_wait_s} s; is it running, and is SPARKGRID_REDIS_URL right?"
    sleep 2 || true
    waited=$((waited + 2))
done

# set_head_cmd RAY_ADDRESS: the scheduler's command line, into the array head_cmd
set_head_cmd() {
    head_cmd=(sparkgrid head --ray-address "$1" --host "$grpc_host"
        --grpc-port "$grpc_port" --metrics-port "$metrics_port" --routing "$policy")
    if [[ -n $tls_cert ]]; then
        head_cmd+=(--tls-cert "$tls_cert" --tls-key "$tls_key")
    fi
    sg_add_opt head_cmd --prices "$prices"
    if [[ -n $link_port ]]; then
        head_cmd+=(--worker-link-port "$link_port")
        if [[ -n $link_cert ]]; then
            head_cmd+=(--worker-link-cert "$link_cert" --worker-link-key "$link_key")
        else
            head_cmd+=(--worker-link-plaintext)
        fi
    fi
    if ((allow_unregistered)); then
        head_cmd+=(--allow-unregistered)
    fi
    sg_add_words head_cmd "${SPARKGRID_HEAD_EXTRA_ARGS:-}"
}

# -- a second scheduler: Ray runs already -----------------------------------------------------
if [[ -n ${SPARKGRID_JOIN_RAY:-} ]]; then
    [[ $SPARKGRID_JOIN_RAY == *:* ]] || sg_die "SPARKGRID_JOIN_RAY: expected HOST:PORT of the Ray head, got '$SPARKGRID_JOIN_RAY'"
    sg_raise_nofile
    set_head_cmd "$SPARKGRID_JOIN_RAY"
    sg_log "starting a scheduler on the Ray cluster at $SPARKGRID_JOIN_RAY: ${head_cmd[*]}"
    SPARKGRID_REDIS_URL=$SPARKGRID_REDIS_URL "${head_cmd[@]}" &
    head_pid=$!
    while ((!SG_STOP_REQUESTED)) && sg_alive "$head_pid"; do
        sleep 1 || true
    done
    status=0
    if ((SG_STOP_REQUESTED)); then
        sg_stop_child "$head_pid" "the scheduler"  # it drains: health says NOT_SERVING first
    else
        wait "$head_pid" || status=$?
        sg_log "the scheduler exited (status $status)"
    fi
    exit "$status"
fi

# -- the Ray head -----------------------------------------------------------------------------
sg_raise_nofile
ray_cmd=()
if ! sg_kuberay_ray_cmd ray_cmd; then
    ray_cmd=(ray start --head --port "$ray_port"
        --dashboard-host "$dashboard_host" --dashboard-port "$dashboard_port"
        --metrics-export-port "$ray_metrics_port" --block)
    sg_add_opt ray_cmd --node-ip-address "$node_ip"
    sg_add_words ray_cmd "${SPARKGRID_RAY_EXTRA_ARGS:-}"
fi
sg_log "starting Ray: ${ray_cmd[*]}"
"${ray_cmd[@]}" &
ray_pid=$!

gcs_host=${node_ip:-127.0.0.1}
sg_wait_until "$ray_wait_s" "$ray_pid" "Ray's GCS at $gcs_host:$ray_port" sg_tcp_open "$gcs_host" "$ray_port"
sg_log "Ray head is up: workers join ${node_ip:-this host}:$ray_port;" \
    "dashboard on $dashboard_host:$dashboard_port"

# -- the scheduler ----------------------------------------------------------------------------
set_head_cmd "$gcs_host:$ray_port"
sg_log "starting the scheduler: ${head_cmd[*]}"
SPARKGRID_REDIS_URL=$SPARKGRID_REDIS_URL "${head_cmd[@]}" &
head_pid=$!

sg_supervise "$ray_pid" "$head_pid" "the scheduler"
