# shellcheck shell=bash
# Shared by start-head.sh, start-worker.sh and join-worker.sh (sourced, not run). Knows: how to
# find the installation and the model pair, Ray's token authentication, the operator token, and
# how to supervise the two long-running processes of a cluster node (Ray, then sparkgrid) so
# that a stop drains sparkgrid before Ray goes. Does not know: what the head or a worker does.
#
# Every setting is an environment variable; `SG_ROLE` (head, worker, linked-worker) names the
# caller in messages. Nothing here prints a secret: Redis URLs are shown without their
# password, tokens not at all.

# bash >= 4.4: empty arrays under `set -u`, and namerefs.
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
    echo "error: ${0##*/} needs bash >= 4.4; this is bash $BASH_VERSION" >&2
    exit 1
fi

SG_ROLE=${SG_ROLE:-node}
SG_STOP_REQUESTED=0

sg_log() { printf '[sparkgrid %s] %s\n' "$SG_ROLE" "$*" >&2; }
sg_die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# A trapped signal only sets a flag; the supervisor acts on it. Installed before any child
# starts, so that a stop that arrives during start-up is not lost.
sg_on_signal() { SG_STOP_REQUESTED=1; }
sg_install_traps() { trap sg_on_signal TERM INT HUP; }

# sg_require_uint NAME VALUE: VALUE is a whole number (a port, a timeout).
sg_require_uint() {
    [[ $2 =~ ^[0-9]+$ ]] || sg_die "$1: expected a whole number, got '$2'"
}

# sg_require_port NAME VALUE
sg_require_port() {
    sg_require_uint "$1" "$2"
    (($2 >= 1 && $2 <= 65535)) || sg_die "$1: expected a port in 1..65535, got $2"
}

# sg_require_flag NAME VALUE: VALUE is 1 (on) or 0 (off).
# sg_check_worker DEVICE PRICE NAME DRAFT_VOCAB MAX_BATCH_TOKENS: the settings every worker
# script takes, checked (empty NAME, DRAFT_VOCAB, MAX_BATCH_TOKENS: sparkgrid's defaults).
sg_check_worker() {
    [[ $1 =~ ^(cpu|cuda(:[0-9]+)?)$ ]] || sg_die "SPARKGRID_DEVICE: expected cuda, cuda:N or cpu, got '$1'"
    [[ $2 =~ ^[0-9]+([.][0-9]+)?$ ]] || sg_die "SPARKGRID_PRICE_PER_HOUR: expected USD per hour such as 0.45, got '$2'"
    if [[ -n $3 && ! $3 =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$ ]]; then
        sg_die "SPARKGRID_WORKER_NAME: expected up to 63 of A-Z a-z 0-9 . _ -, got '$3'"
    fi
    [[ -z $4 ]] || sg_require_uint SPARKGRID_DRAFT_VOCAB "$4"
    [[ -z $5 ]] || sg_require_uint SPARKGRID_MAX_BATCH_TOKENS "$5"
}

sg_require_flag() {
    [[ $2 == 0 || $2 == 1 ]] || sg_die "$1: expected 1 (on) or 0 (off), got '$2'"
}

# sg_words NAME STRING: split STRING on whitespace into the array NAME (for *_EXTRA_ARGS).
# Quotes inside STRING are not interpreted: pass no value that contains spaces.
sg_words() {
    local -n _out=$1
    _out=()
    if [[ -n ${2:-} ]]; then
        read -r -a _out <<<"$2"
    fi
}

# sg_add_opt NAME FLAG VALUE: append FLAG VALUE to the array NAME unless VALUE is empty.
sg_add_opt() {
    local -n _opt_to=$1
    if [[ -n $3 ]]; then
        _opt_to+=("$2" "$3")
    fi
}

# sg_add_words NAME STRING: append the words of STRING (an *_EXTRA_ARGS value) to the array NAME.
sg_add_words() {
    local -n _words_to=$1
    local _words
    sg_words _words "$2"
    _words_to+=("${_words[@]}")
}

# Put $SPARKGRID_VENV/bin first on PATH (the virtual environment sparkgrid is installed in),
# check that `ray` and `sparkgrid` are there, and pick the Python that sparkgrid runs on.
sg_setup_path() {
    if [[ -n ${SPARKGRID_VENV:-} ]]; then
        [[ -x $SPARKGRID_VENV/bin/sparkgrid ]] ||
            sg_die "SPARKGRID_VENV=$SPARKGRID_VENV has no bin/sparkgrid; install sparkgrid there (pip install .)"
        PATH=$SPARKGRID_VENV/bin:$PATH
        export PATH
    fi
    command -v sparkgrid >/dev/null ||
        sg_die "'sparkgrid' is not on PATH; install it (pip install .) or set SPARKGRID_VENV"
    command -v ray >/dev/null ||
        sg_die "'ray' is not on PATH; sparkgrid's dependencies are incomplete (pip install 'ray[default]==2.60.*')"
    if [[ -z ${SPARKGRID_PYTHON:-} ]]; then
        # The interpreter of the sparkgrid console script: the one that has sparkgrid's modules.
        local shebang
        IFS= read -r shebang <"$(command -v sparkgrid)" || true
        shebang=${shebang#\#!}
        if [[ $shebang == /* && -x $shebang ]]; then
            SPARKGRID_PYTHON=$shebang
        else
            SPARKGRID_PYTHON=python3
        fi
    fi
    "$SPARKGRID_PYTHON" -c 'import redis, ray, worker, scheduler' 2>/dev/null ||
        sg_die "$SPARKGRID_PYTHON cannot import sparkgrid's modules; set SPARKGRID_PYTHON to the Python sparkgrid is installed in"
}

# sg_models TARGET_VAR DRAFT_VAR: the model pair from SPARKGRID_TARGET and SPARKGRID_DRAFT, both
# given or neither (then the pair shipped inside the package), each a directory with a
# config.json. Needs sg_setup_path first (it asks sparkgrid's Python for the shipped pair).
sg_models() {
    local -n _target=$1 _draft=$2
    _target=${SPARKGRID_TARGET:-}
    _draft=${SPARKGRID_DRAFT:-}
    if [[ -z $_target && -z $_draft ]]; then
        local pair
        pair=$("$SPARKGRID_PYTHON" -c 'from worker.models import shipped_pair
p = shipped_pair()
print(f"{p[0]}\n{p[1]}" if p else "")') || sg_die "could not look up the shipped model pair"
        [[ -n $pair ]] || sg_die "this installation has no shipped model pair; set SPARKGRID_TARGET and SPARKGRID_DRAFT"
        _target=${pair%%$'\n'*}
        _draft=${pair#*$'\n'}
        sg_log "models: the shipped pair (target $_target, draft $_draft)"
    elif [[ -z $_target || -z $_draft ]]; then
        sg_die "set both SPARKGRID_TARGET and SPARKGRID_DRAFT, or neither (the shipped pair)"
    fi
    [[ -f $_target/config.json ]] || sg_die "SPARKGRID_TARGET=$_target: no config.json there (a target model directory)"
    [[ -f $_draft/config.json ]] || sg_die "SPARKGRID_DRAFT=$_draft: no config.json there (a DSpark draft directory)"
}

# sg_warn_if_readable_by_all FILE: a secret's file should not be readable by every user.
sg_warn_if_readable_by_all() {
    local mode
    mode=$(stat -c '%a' "$1" 2>/dev/null || true)
    if [[ ${#mode} -ge 3 && ${mode: -1} != 0 ]]; then
        sg_log "warning: every user of this machine can read $1 (mode $mode); chmod o-rwx it"
    fi
}

# sg_operator_token: the operator token (`sparkgrid operators add` printed it; it registers
# this node's workers) from the first line of SPARKGRID_OPERATOR_TOKEN_FILE, else from
# SPARKGRID_OPERATOR_TOKEN; exported as SPARKGRID_OPERATOR_TOKEN, where `sparkgrid worker`
# reads it (an argument would show in every user's `ps`). Returns 1 when none is set.
sg_operator_token() {
    local from=SPARKGRID_OPERATOR_TOKEN
    if [[ -n ${SPARKGRID_OPERATOR_TOKEN_FILE:-} ]]; then
        from="SPARKGRID_OPERATOR_TOKEN_FILE=$SPARKGRID_OPERATOR_TOKEN_FILE"
        [[ -r $SPARKGRID_OPERATOR_TOKEN_FILE && -f $SPARKGRID_OPERATOR_TOKEN_FILE ]] ||
            sg_die "$from is not a readable file (it holds the operator token)"
        SPARKGRID_OPERATOR_TOKEN=
        IFS= read -r SPARKGRID_OPERATOR_TOKEN <"$SPARKGRID_OPERATOR_TOKEN_FILE" || true
        [[ -n ${SPARKGRID_OPERATOR_TOKEN//[[:space:]]/} ]] || sg_die "$from: the file is empty"
        sg_warn_if_readable_by_all "$SPARKGRID_OPERATOR_TOKEN_FILE"
    fi
    SPARKGRID_OPERATOR_TOKEN=${SPARKGRID_OPERATOR_TOKEN:-}
    SPARKGRID_OPERATOR_TOKEN=${SPARKGRID_OPERATOR_TOKEN//[[:space:]]/}  # a file's CR, stray blanks
    if [[ -z $SPARKGRID_OPERATOR_TOKEN ]]; then
        unset SPARKGRID_OPERATOR_TOKEN  # an empty one would reach `sparkgrid worker` as malformed
        return 1
    fi
    [[ $SPARKGRID_OPERATOR_TOKEN == sgo_* ]] ||
        sg_die "$from: not an operator token (expected sgo_<id>_<secret>, as \`sparkgrid operators add\` printed it)"
    export SPARKGRID_OPERATOR_TOKEN
}

# Ray token authentication: always on. The token comes, in Ray's own order, from
# RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. Every node and
# every driver of the cluster needs the same token. `generate` (the head, and a linked
# worker's Ray of its own) creates ~/.ray/auth_token when no token is configured at all.
sg_require_token_auth() {
    if [[ -n ${RAY_AUTH_MODE:-} && $RAY_AUTH_MODE != token ]]; then
        sg_die "RAY_AUTH_MODE=$RAY_AUTH_MODE: sparkgrid nodes run with Ray token authentication only" \
            "(a Ray node lets its cluster run any code on it); unset RAY_AUTH_MODE or set it to 'token'"
    fi
    export RAY_AUTH_MODE=token
}

sg_setup_ray_auth() {
    local may_generate=${1:-no}
    sg_require_token_auth
    if [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
        sg_log "Ray token: from RAY_AUTH_TOKEN"
        return
    fi
    local file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    if [[ -n ${RAY_AUTH_TOKEN_PATH:-} ]]; then
        [[ -r $file && -s $file ]] ||
            sg_die "RAY_AUTH_TOKEN_PATH=$file is not a readable, non-empty file (the cluster's Ray token)"
    elif [[ ! -s $file ]]; then
        if [[ $may_generate != generate ]]; then
            sg_die "no Ray token on this node: copy the head's token (its ~/.ray/auth_token) to $file" \
                "(mode 600), or set RAY_AUTH_TOKEN_PATH to a file holding it"
        fi
        if [[ $SG_ROLE == head ]]; then
            sg_log "no Ray token yet: generating $file (copy it to every worker node, mode 600)"
        else
            sg_log "no Ray token yet: generating $file for this machine's own Ray"
        fi
        (umask 077 && ray get-auth-token --generate >/dev/null) ||
            sg_die "could not generate a Ray token with 'ray get-auth-token --generate'"
    fi
    sg_warn_if_readable_by_all "$file"
    sg_log "Ray token: from $file"
}

# Raise the soft limit of open files: Ray keeps a connection per worker process and node.
sg_raise_nofile() {
    local want=65536 soft hard
    soft=$(ulimit -Sn)
    hard=$(ulimit -Hn)
    if [[ $soft == unlimited ]] || ((soft >= want)); then
        return 0
    fi
    if [[ $hard != unlimited ]] && ((hard < want)); then
        want=$hard
    fi
    ulimit -Sn "$want" 2>/dev/null || sg_log "warning: could not raise the open-files limit to $want"
}

# sg_tcp_open HOST PORT [SECONDS]: something accepts TCP connections there.
sg_tcp_open() {
    # shellcheck disable=SC2016  # $1 and $2 are the inner shell's arguments
    timeout "${3:-3}" bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# sg_alive PID
sg_alive() { kill -0 "$1" 2>/dev/null; }

# sg_stop_child PID NAME: SIGTERM, then wait until it has exited (however long it drains;
# whoever stops this script, systemd, Docker or Kubernetes, bounds that with its own timeout).
sg_stop_child() {
    local pid=$1 name=$2
    if sg_alive "$pid"; then
        sg_log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
    fi
    while sg_alive "$pid"; do
        wait "$pid" 2>/dev/null || true
    done
}

# sg_supervise RAY_PID APP_PID APP_NAME: run until a stop is asked for (SIGTERM, SIGINT,
# SIGHUP) or either process exits; then stop the application first (a worker drains its
# running jobs, the scheduler lets its streams end) and Ray second. Exits 0 after a stop that
# was asked for, else with the status of the process that ended on its own. (It polls: bash's
# `wait -n` misses a child that ended before it was called.)
sg_supervise() {
    local ray_pid=$1 app_pid=$2 app_name=$3
    local status=0
    while ((!SG_STOP_REQUESTED)) && sg_alive "$ray_pid" && sg_alive "$app_pid"; do
        sleep 1 || true
    done
    if ((SG_STOP_REQUESTED)); then
        sg_log "stop requested"
    elif ! sg_alive "$ray_pid"; then
        wait "$ray_pid" || status=$?
        sg_log "Ray exited (status $status); stopping $app_name"
    else
        wait "$app_pid" || status=$?
        sg_log "$app_name exited (status $status); stopping Ray"
    fi
    sg_stop_child "$app_pid" "$app_name"
    sg_stop_child "$ray_pid" "Ray"
    sg_log "stopped"
    exit "$status"
}

# sg_wait_until SECONDS PID WHAT CMD...: run CMD every second until it succeeds; fail when PID
# (the Ray process) has died, a stop was asked for, or SECONDS have passed.
sg_wait_until() {
    local limit=$1 pid=$2 what=$3
    shift 3
    local waited=0
    until "$@"; do
        if ((SG_STOP_REQUESTED)); then
            sg_stop_child "$pid" "Ray"
            exit 0
        fi
        sg_alive "$pid" || sg_die "Ray exited while waiting for $what; see its output above"
        ((waited < limit)) || {
            sg_stop_child "$pid" "Ray"
            sg_die "$what: not ready after ${limit} s"
        }
        sleep 1 || true
        waited=$((waited + 1))
    done
}

# sg_settle PID SECONDS WHAT: give PID (the Ray process) SECONDS to fail; fail if it does.
# (A refused token or a wrong address makes `ray start` fail within seconds.)
sg_settle() {
    local pid=$1 left=$2 what=$3
    while ((left > 0)); do
        if ((SG_STOP_REQUESTED)); then
            sg_stop_child "$pid" "Ray"
            exit 0
        fi
        sg_alive "$pid" || sg_die "Ray exited while $what; see its output above (a wrong token?)"
        sleep 1 || true
        left=$((left - 1))
    done
}

# sg_kuberay_ray_cmd NAME: in a KubeRay pod, the `ray start` command KubeRay generated for it
# (with --block) into the array NAME; returns 1 elsewhere. Set SPARKGRID_USE_KUBERAY_CMD=0 to
# build the command from this script's variables instead.
sg_kuberay_ray_cmd() {
    local -n _cmd=$1
    if [[ -z ${KUBERAY_GEN_RAY_START_CMD:-} || ${SPARKGRID_USE_KUBERAY_CMD:-1} == 0 ]]; then
        return 1
    fi
    sg_words "$1" "$KUBERAY_GEN_RAY_START_CMD"
    [[ " ${_cmd[*]} " == *" --block "* ]] || _cmd+=(--block)
    return 0
}
