#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# start-worker.sh: a trusted node's GPU joins the network as a member of the platform's Ray
# cluster (GPUs the platform runs itself, or an operator's it trusts like itself: a member can
# run code on every node, the head included; anyone else runs join-worker.sh, the worker link).
# Joins the cluster (`ray start --address HEAD:6379`, with the cluster's token), then runs
# `sparkgrid worker ... --foreground`: a named worker actor pinned to this node, registered
# with the operator token, health-checked every 5 s.
# SIGTERM or Ctrl-C drains the worker (running jobs finish, up to 120 s) and removes it, then
# stops Ray on this node; give the whole stop 180 s before killing (systemd TimeoutStopSec,
# docker --stop-timeout, Kubernetes terminationGracePeriodSeconds).
#
# Settings (environment variables; defaults in brackets):
#   SPARKGRID_HEAD              the head's Ray address HOST:PORT, over the private network,
#                               e.g. 10.8.0.1:6379 (required; in a KubeRay pod: KubeRay's)
#   SPARKGRID_DEVICE            torch device: cuda, cuda:1, cpu [cuda]
#   SPARKGRID_GPU_TYPE          what the device is, e.g. "RTX 4090" [detected: Ray's
#                               accelerator type, else the CUDA device name]
#   SPARKGRID_PRICE_PER_HOUR    what this device costs per hour, USD [0]
#   SPARKGRID_WORKER_NAME       unique in the cluster, e.g. gpu-7 [<host>-<device>]
#   SPARKGRID_TARGET            target model directory (Qwen3/Llama) [the shipped pair's]
#   SPARKGRID_DRAFT             its DSpark draft directory [the shipped pair's]
#   SPARKGRID_MAX_BATCH_TOKENS  most tokens in one verify forward [sparkgrid's default, 512]
#   SPARKGRID_DRAFT_VOCAB       draft only the N most frequent tokens [0: the full vocabulary]
#   SPARKGRID_WORKER_EXTRA_ARGS more `sparkgrid worker` options, space-separated []
#   SPARKGRID_OPERATOR_TOKEN    the operator token (`sparkgrid operators add`) that registers
#                               the worker; a scheduler requiring registrations (the default)
#                               routes nothing to an unregistered worker []
#   SPARKGRID_OPERATOR_TOKEN_FILE   a file holding that token (keeps it out of the env)
#   SPARKGRID_NODE_IP           this node's private address (Ray's --node-ip-address) [Ray's
#                               guess: the address it reaches the head from]
#   SPARKGRID_RAY_METRICS_PORT  Ray's Prometheus endpoint on this node [8080]
#   SPARKGRID_RAY_EXTRA_ARGS    more `ray start` options, space-separated []
#   SPARKGRID_RAY_WAIT_S        how long the head may take to answer [60]
#   SPARKGRID_RAY_SETTLE_S      how long `ray start` must survive before the worker starts [5]
#   SPARKGRID_VENV              the virtual environment sparkgrid is installed in [PATH's]
#   RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN    the cluster's Ray token, a copy of the head's
#                               [~/.ray/auth_token]
set -euo pipefail

SG_ROLE="worker"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sg_install_traps
sg_require_token_auth

if ! sg_operator_token; then
    sg_log "warning: no SPARKGRID_OPERATOR_TOKEN(_FILE): the worker is unregistered, and a" \
        "scheduler requiring registrations (the default) routes nothing to it"
fi

device=${SPARKGRID_DEVICE:-cuda}
gpu_type=${SPARKGRID_GPU_TYPE:-}
price=${SPARKGRID_PRICE_PER_HOUR:-0}
name=${SPARKGRID_WORKER_NAME:-}
max_batch_tokens=${SPARKGRID_MAX_BATCH_TOKENS:-}
draft_vocab=${SPARKGRID_DRAFT_VOCAB:-}
node_ip=${SPARKGRID_NODE_IP:-}
ray_metrics_port=${SPARKGRID_RAY_METRICS_PORT:-8080}
ray_wait_s=${SPARKGRID_RAY_WAIT_S:-60}
settle_s=${SPARKGRID_RAY_SETTLE_S:-5}

# -- check everything before starting anything ------------------------------------------------
ray_cmd=()
kuberay=0
if sg_kuberay_ray_cmd ray_cmd; then
    kuberay=1
    # KubeRay generated `ray start --address=<head service>:6379 ...`: join the same address.
    head=${SPARKGRID_HEAD:-}
    if [[ -z $head && " ${ray_cmd[*]} " =~ \ --address=([^ ]+)\  ]]; then
        head=${BASH_REMATCH[1]}
    fi
    head=${head:-auto}
else
    head=${SPARKGRID_HEAD:-}
    [[ -n $head ]] || sg_die "SPARKGRID_HEAD is not set: the head's Ray address, HOST:6379 over the private network"
fi
if [[ $head != auto ]]; then
    [[ $head =~ ^(.+):([0-9]+)$ ]] || sg_die "SPARKGRID_HEAD=$head: expected HOST:PORT, e.g. 10.8.0.1:6379"
    head_host=${BASH_REMATCH[1]}
    head_port=${BASH_REMATCH[2]}
    sg_require_port "SPARKGRID_HEAD's port" "$head_port"
fi
sg_check_worker "$device" "$price" "$name" "$draft_vocab" "$max_batch_tokens"
sg_require_port SPARKGRID_RAY_METRICS_PORT "$ray_metrics_port"
sg_require_uint SPARKGRID_RAY_WAIT_S "$ray_wait_s"
sg_require_uint SPARKGRID_RAY_SETTLE_S "$settle_s"

sg_setup_path
sg_setup_ray_auth

target='' draft=''
sg_models target draft

# The head must answer before this node joins: a clear message beats Ray's retries. (KubeRay
# runs its own wait for the head's GCS in an init container.)
if [[ $head != auto && $kuberay == 0 ]]; then
    sg_log "checking the head at $head (up to ${ray_wait_s} s)"
    waited=0
    until sg_tcp_open "$head_host" "$head_port"; do
        ((SG_STOP_REQUESTED)) && exit 0
        ((waited < ray_wait_s)) ||
            sg_die "nothing answers at SPARKGRID_HEAD=$head; is the head up, and is this node on its private network (WireGuard)?"
        sleep 2 || true
        waited=$((waited + 2))
    done
fi

# -- join the Ray cluster ---------------------------------------------------------------------
sg_raise_nofile
if ((${#ray_cmd[@]} == 0)); then
    ray_cmd=(ray start --address "$head" --metrics-export-port "$ray_metrics_port" --block)
    sg_add_opt ray_cmd --node-ip-address "$node_ip"
    sg_add_words ray_cmd "${SPARKGRID_RAY_EXTRA_ARGS:-}"
fi
sg_log "joining the Ray cluster: ${ray_cmd[*]}"
"${ray_cmd[@]}" &
ray_pid=$!
# The worker itself waits for this node's raylet to register.
sg_settle "$ray_pid" "$settle_s" "joining the cluster at $head"

# -- the worker -------------------------------------------------------------------------------
worker_cmd=(sparkgrid worker --ray-address "$head" --target "$target" --draft "$draft"
    --device "$device" --price-per-hour "$price" --foreground)
sg_add_opt worker_cmd --gpu-type "$gpu_type"
sg_add_opt worker_cmd --name "$name"
sg_add_opt worker_cmd --max-batch-tokens "$max_batch_tokens"
sg_add_opt worker_cmd --draft-vocab "$draft_vocab"
sg_add_words worker_cmd "${SPARKGRID_WORKER_EXTRA_ARGS:-}"
sg_log "starting the worker: ${worker_cmd[*]}"
"${worker_cmd[@]}" &
worker_pid=$!

sg_supervise "$ray_pid" "$worker_pid" "the worker"
