#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# join-worker.sh: a node operator's GPU serves the network from outside the platform's Ray
# cluster, through the head's worker link. Checks its settings, then becomes (exec) `sparkgrid
# worker --join HOST:PORT`: that command starts a Ray of its own on this machine (or uses the
# operator's own cluster, SPARKGRID_RAY_ADDRESS), loads the engine in an actor there, and
# dials the head over TLS with the operator token. It dials out: nothing here needs an inbound
# port, and no WireGuard, no Ray token of the platform, no Python or Ray version matching the
# head's. With SPARKGRID_DEVICE=cuda it serves every GPU its Ray has, a worker each (NAME-0,
# NAME-1, ...; with one GPU just NAME). A dropped link is dialled again with backoff.
# SIGTERM or Ctrl-C drains the workers (running jobs finish, up to 120 s), closes the links and
# stops its Ray; give the whole stop 180 s before killing (systemd TimeoutStopSec, docker
# --stop-timeout). Exit status 2: the head or the command refused a setting it names (a wrong
# or revoked token, a worker name another operator holds, an untrusted certificate); starting
# again changes nothing until it is fixed. Status 1: a setting of this script, or the workers
# ended.
#
# Settings (environment variables; defaults in brackets):
#   SPARKGRID_LINK              the head's worker link HOST:PORT, e.g. head.example.org:50060
#                               (required; the platform gives it: `up.json`'s worker_link)
#   SPARKGRID_OPERATOR_TOKEN_FILE   a file holding the operator token that `sparkgrid operators
#                               add` printed for you (required, or:)
#   SPARKGRID_OPERATOR_TOKEN    the token itself (the file keeps it out of the environment file)
#   SPARKGRID_CA                the CA certificate (PEM) that signed the head's certificate, as
#                               the platform gives it [the system's roots]
#   SPARKGRID_LINK_PLAINTEXT    1: no TLS (a head on this machine or a private network only) [0]
#   SPARKGRID_DEVICE            torch device: cuda, cuda:1, cpu [cuda]
#   SPARKGRID_GPU_TYPE          what the device is, e.g. "RTX 4090" [detected: Ray's
#                               accelerator type, else the CUDA device name]
#   SPARKGRID_PRICE_PER_HOUR    what this device costs per hour, USD [0]
#   SPARKGRID_WORKER_NAME       the worker's name, yours once registered, e.g. gpu-7
#                               [<host>-<device>]
#   SPARKGRID_TARGET            target model directory (Qwen3/Llama) [the shipped pair's]
#   SPARKGRID_DRAFT             its DSpark draft directory [the shipped pair's]
#   SPARKGRID_MAX_BATCH_TOKENS  most tokens in one verify forward [sparkgrid's default, 512]
#   SPARKGRID_DRAFT_VOCAB       draft only the N most frequent tokens [0: the full vocabulary]
#   SPARKGRID_RAY_ADDRESS       your own Ray cluster's address, for several GPUs on several
#                               machines (never the platform's) [a local Ray started for it]
#   SPARKGRID_WORKER_EXTRA_ARGS more `sparkgrid worker` options, space-separated []
#   SPARKGRID_VENV              the virtual environment sparkgrid is installed in [PATH's]
#   RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN    the token of your own Ray (never the platform's)
#                               [~/.ray/auth_token, generated on first start for a local Ray]
# (SPARKGRID_HEAD, the Ray address a trusted node joins with start-worker.sh, has no use here;
# set without SPARKGRID_LINK it earns a hint.)
set -euo pipefail

SG_ROLE="linked-worker"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# Its own Ray gets token authentication too (a Ray node runs whatever code its cluster is
# sent): a local one's token is generated below; your own cluster's you copy here.
sg_require_token_auth

link=${SPARKGRID_LINK:-}
ca=${SPARKGRID_CA:-}
plaintext=${SPARKGRID_LINK_PLAINTEXT:-0}
device=${SPARKGRID_DEVICE:-cuda}
gpu_type=${SPARKGRID_GPU_TYPE:-}
price=${SPARKGRID_PRICE_PER_HOUR:-0}
name=${SPARKGRID_WORKER_NAME:-}
max_batch_tokens=${SPARKGRID_MAX_BATCH_TOKENS:-}
draft_vocab=${SPARKGRID_DRAFT_VOCAB:-}
ray_address=${SPARKGRID_RAY_ADDRESS:-}

# -- check everything before starting anything ------------------------------------------------
if [[ -z $link ]]; then
    if [[ -n ${SPARKGRID_HEAD:-} ]]; then
        sg_die "SPARKGRID_LINK is not set (SPARKGRID_HEAD is the Ray address a cluster member" \
            "joins, start-worker.sh's): set SPARKGRID_LINK to the head's worker link HOST:PORT, e.g. head.example.org:50060"
    fi
    sg_die "SPARKGRID_LINK is not set: the head's worker link HOST:PORT, e.g. head.example.org:50060 (ask the platform)"
fi
[[ $link =~ ^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]+)$ ]] ||
    sg_die "SPARKGRID_LINK=$link: expected HOST:PORT, e.g. head.example.org:50060"
link_host=${BASH_REMATCH[1]}
link_port=${BASH_REMATCH[2]}
sg_require_port "SPARKGRID_LINK's port" "$link_port"
sg_require_flag SPARKGRID_LINK_PLAINTEXT "$plaintext"
if [[ -n $ca ]]; then
    ((!plaintext)) || sg_die "SPARKGRID_CA and SPARKGRID_LINK_PLAINTEXT=1: choose one (the CA is for TLS)"
    [[ -r $ca && -f $ca ]] || sg_die "SPARKGRID_CA=$ca is not a readable file (the platform's CA certificate, PEM)"
    grep -q -e '-----BEGIN CERTIFICATE-----' "$ca" ||
        sg_die "SPARKGRID_CA=$ca: not a PEM certificate (expected -----BEGIN CERTIFICATE-----)"
fi
sg_operator_token ||
    sg_die "no operator token: set SPARKGRID_OPERATOR_TOKEN_FILE to a file holding the token" \
        "\`sparkgrid operators add\` printed for you (or SPARKGRID_OPERATOR_TOKEN); the platform gives it"
sg_check_worker "$device" "$price" "$name" "$draft_vocab" "$max_batch_tokens"
if [[ -n $ray_address && ! $ray_address =~ ^(.+):([0-9]+)$ ]]; then
    sg_die "SPARKGRID_RAY_ADDRESS=$ray_address: expected HOST:PORT of your own Ray cluster's head"
fi

sg_setup_path
target='' draft=''
sg_models target draft
if [[ -n $ray_address ]]; then
    sg_setup_ray_auth           # your cluster's token, as on its other nodes
else
    sg_setup_ray_auth generate  # ~/.ray/auth_token, mode 600, made once
fi

case $link_port in
6379 | 50051)
    sg_log "note: SPARKGRID_LINK=$link names port $link_port, which on a head is Ray's or the" \
        "client API's; the worker link is another port (50060 unless the platform says otherwise)"
    ;;
esac
# A hint for the log only: the command itself dials with backoff until the head answers.
if ! sg_tcp_open "${link_host//[][]/}" "$link_port"; then
    sg_log "note: nothing answers at $link yet; the worker will load, then dial it with backoff" \
        "(is the head up, and is outbound traffic to it allowed?)"
fi

# -- the worker, in this process's place: signals reach it directly ----------------------------
sg_raise_nofile
worker_cmd=(sparkgrid worker --join "$link" --target "$target" --draft "$draft"
    --device "$device" --price-per-hour "$price")
sg_add_opt worker_cmd --ca "$ca"
if ((plaintext)); then
    worker_cmd+=(--plaintext)
fi
sg_add_opt worker_cmd --gpu-type "$gpu_type"
sg_add_opt worker_cmd --name "$name"
sg_add_opt worker_cmd --max-batch-tokens "$max_batch_tokens"
sg_add_opt worker_cmd --draft-vocab "$draft_vocab"
sg_add_opt worker_cmd --ray-address "$ray_address"
sg_add_words worker_cmd "${SPARKGRID_WORKER_EXTRA_ARGS:-}"
# The token travels in the environment (SPARKGRID_OPERATOR_TOKEN), never in the arguments.
sg_log "starting the linked worker: ${worker_cmd[*]}"
exec "${worker_cmd[@]}"
