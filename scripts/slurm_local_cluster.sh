#!/usr/bin/env bash
# A SLURM cluster on this machine (localhost), for trying the sbatch scripts and `reproduce.py --launcher slurm`
# without a real cluster. Needs root and Debian's packages:  apt-get install -y slurm-wlm munge
#
#   scripts/slurm_local_cluster.sh start DIR [NODES]   # NODES: 1 (default) or 2 slurmd daemons (n1, n2)
#   export SLURM_CONF=DIR/slurm.conf                   # then sbatch, srun, squeue, scontrol talk to it
#   scripts/slurm_local_cluster.sh stop DIR
#
# Everything lives in DIR: slurm.conf, the state, the daemons' logs and pid files. slurmd's spool folder
# holds sockets, whose paths must be short: it is a /tmp/slurmd-spool.* folder, which `stop` removes.
# The cluster has one partition "batch" with this machine's CPUs (split between the nodes), 80% of the
# memory available now, no GPUs. Its ports come free from the OS, so several such clusters can run side
# by side; its job ids start at a random number, so jobs of two clusters do not share ids (nor the
# rendezvous port that Lightning derives from the job id). Finished jobs stay visible to
# `scontrol show job` for an hour. munged is started only if it is not running yet (its key created only
# if missing); `stop` leaves it running, as other clusters may use it. `stop` cancels the cluster's jobs,
# then ends slurmctld and slurmd by the pids in their pid files.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin # the daemons

usage() {
    echo "usage: $0 start DIR [NODES] | stop DIR" >&2
    exit 2
}

die() {
    echo "error: $*" >&2
    exit 1
}

free_port() {
    # a port the OS hands out as free at this moment
    if command -v python3 >/dev/null 2>&1 &&
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null; then
        return
    fi
    local p
    while :; do
        p=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return # a munged is running already
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null 2>&1; then mungekey -c; else create-munge-key -f; fi
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    # --force: run as root; a second munged started at the same time by another cluster fails to take the
    # socket, which is fine as long as one of them answers
    /usr/sbin/munged --force 2>/dev/null || true
    for _ in $(seq 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
        sleep 0.1
    done
    die "munged did not start (munge -n | unmunge fails)"
}

write_conf() {
    local dir=$1 nodes=$2 spool=$3 cpus mem per_cpus per_mem ctld_port first_id
    cpus=$(nproc)
    # memory SLURM may hand out: 80% of what is available now, in MB
    mem=$(awk '/MemAvailable/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    ctld_port=$(free_port)
    first_id=$((10000 + RANDOM % 9000))
    cat >"$dir/slurm.conf" <<EOF
# written by scripts/slurm_local_cluster.sh
ClusterName=local
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmUser=root
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmdSpoolDir=$spool/%n
StateSaveLocation=$dir/state
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.%n.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
FirstJobId=$first_id
MinJobAge=3600
KillWait=10
SchedulerParameters=sched_interval=1,bf_interval=1
EOF
    if [ "$nodes" = 1 ]; then
        echo "NodeName=localhost Port=$(free_port) CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$dir/slurm.conf"
        echo "PartitionName=batch Nodes=localhost Default=YES MaxTime=INFINITE State=UP" >>"$dir/slurm.conf"
    else
        per_cpus=$((cpus / nodes > 0 ? cpus / nodes : 1))
        per_mem=$((mem / nodes))
        local names=()
        for i in $(seq "$nodes"); do
            echo "NodeName=n$i NodeHostname=localhost Port=$(free_port) CPUs=$per_cpus RealMemory=$per_mem" \
                "State=UNKNOWN" >>"$dir/slurm.conf"
            names+=("n$i")
        done
        echo "PartitionName=batch Nodes=n[1-$nodes] Default=YES MaxTime=INFINITE State=UP" >>"$dir/slurm.conf"
        # code that takes the first node's name as the rendezvous address needs the names to resolve
        for name in "${names[@]}"; do
            getent hosts "$name" >/dev/null || echo "127.0.0.1 $name" >>/etc/hosts
        done
    fi
}

wait_idle() {
    local dir=$1 nodes=$2 n
    for _ in $(seq 300); do
        n=$(sinfo -h -N -o '%T' 2>/dev/null | grep -c '^idle' || true)
        if [ "$n" -ge "$nodes" ]; then return; fi
        sleep 0.1
    done
    echo "--- sinfo" >&2
    sinfo -N >&2 || true
    tail -n 20 "$dir"/slurmctld.log "$dir"/slurmd.*.log >&2 || true
    die "the nodes of $dir/slurm.conf did not become idle within 30 s (logs above)"
}

start() {
    local dir=$1 nodes=${2:-1}
    [ "$(id -u)" = 0 ] || die "starting slurmctld and slurmd needs root"
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null ||
        die "SLURM is not installed: apt-get install -y slurm-wlm munge"
    case "$nodes" in 1 | 2) ;; *) die "NODES must be 1 or 2, got $nodes" ;; esac
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [ ! -e "$dir/slurmctld.pid" ] || die "$dir holds a running cluster (stop it first: $0 stop $dir)"
    mkdir -p "$dir/state"
    start_munge
    # slurmstepd's sockets live in the spool folder and a socket path has at most 108 bytes: a short folder
    local spool
    spool=$(mktemp -d /tmp/slurmd-spool.XXXXXX)
    write_conf "$dir" "$nodes" "$spool"
    export SLURM_CONF=$dir/slurm.conf
    /usr/sbin/slurmctld -i
    if [ "$nodes" = 1 ]; then
        mkdir -p "$spool/localhost"
        /usr/sbin/slurmd
    else
        for i in $(seq "$nodes"); do
            mkdir -p "$spool/n$i"
            /usr/sbin/slurmd -N "n$i"
        done
    fi
    wait_idle "$dir" "$nodes"
    echo "export SLURM_CONF=$dir/slurm.conf"
}

stop() {
    local dir=$1 pidfile pid
    [ -d "$dir" ] || die "no folder $dir"
    dir=$(cd "$dir" && pwd)
    if [ -f "$dir/slurmctld.pid" ]; then # end the jobs still running, so no job step outlives the daemons
        SLURM_CONF=$dir/slurm.conf timeout 10 scancel --quiet --user "$(id -un)" 2>/dev/null || true
    fi
    for pidfile in "$dir"/slurmd.*.pid "$dir"/slurmctld.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
            for _ in $(seq 100); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
    local spool
    spool=$(sed -n 's|^SlurmdSpoolDir=\(/tmp/slurmd-spool\.[A-Za-z0-9]*\)/%n$|\1|p' "$dir/slurm.conf" 2>/dev/null || true)
    if [ -n "$spool" ]; then rm -rf "$spool"; fi
}

[ $# -ge 2 ] || usage
case "$1" in
start) start "$2" "${3:-1}" ;;
stop) stop "$2" ;;
*) usage ;;
esac
