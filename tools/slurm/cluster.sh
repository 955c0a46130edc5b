#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, from Debian's packages, for the Slurm
# launcher's tests (crates/edpo/tests/slurm.rs) and for trying `edpo sweep --launcher slurm`.
#
#   tools/slurm/cluster.sh start [STATE_DIR]   # install if needed, configure, start, wait idle
#   tools/slurm/cluster.sh stop  [STATE_DIR]   # stop every daemon it started
#   tools/slurm/cluster.sh env   [STATE_DIR]   # print `export SLURM_CONF=…` for a shell
#
# The cluster: munged, MariaDB (accounting storage, so that `sacct` answers), slurmdbd,
# slurmctld and slurmd, all as root, one node named after this host with its cores and
# memory, one partition `debug`. Everything it writes lives in STATE_DIR (default
# /tmp/edpo-slurm); the Slurm commands find it through SLURM_CONF=STATE_DIR/slurm.conf.
# Needs root (apt-get and the daemons).
set -euo pipefail

action=${1:-}
state=${2:-/tmp/edpo-slurm}
conf="$state/slurm.conf"

log() { echo "slurm-cluster: $*" >&2; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
    local missing=()
    for cmd in sbatch slurmctld slurmd slurmdbd munged mariadbd; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing slurm-wlm, slurmdbd, munge, mariadb-server (missing: ${missing[*]})"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends \
            slurm-wlm slurmdbd munge mariadb-server >/dev/null
    fi
}

configure() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    # Leave a quarter of the memory (at least 1 GiB) to the daemons and the test process.
    mem_mb=$(awk '/MemTotal/ { m = int($2 / 1024); r = int(m / 4); if (r < 1024) r = 1024; print m - r }' /proc/meminfo)
    mkdir -p "$state"/{ctld,slurmd,log,mysql,run}
    cat >"$conf" <<EOF
# Written by tools/slurm/cluster.sh: one node, this machine.
ClusterName=edpo
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/slurmd
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# A cancelled or timed-out task gets SIGTERM, then SIGKILL this many seconds later.
KillWait=10
# Finished jobs stay visible to squeue / scontrol for this long.
MinJobAge=600
MaxArraySize=10001
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$state/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=edpo-slurm
StorageLoc=slurm_acct_db
PidFile=$state/run/slurmdbd.pid
LogFile=$state/log/slurmdbd.log
EOF
    chmod 600 "$state/slurmdbd.conf"
    # slurmctld reads slurmdbd.conf beside slurm.conf only for its checks; slurmdbd takes it
    # from the directory of SLURM_CONF.
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    mkdir -p /run/munge
    chown munge:munge /run/munge
    [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom bs=128 count=1 of=/etc/munge/munge.key 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    runuser -u munge -- /usr/sbin/munged
}

start_mariadb() {
    if [ ! -d "$state/mysql/mysql" ]; then
        mariadb-install-db --user=root --datadir="$state/mysql" --auth-root-authentication-method=socket >"$state/log/mariadb-install.log" 2>&1
    fi
    if ! pid_alive "$state/run/mariadb.pid"; then
        mariadbd --user=root --datadir="$state/mysql" --socket="$state/run/mysqld.sock" \
            --port=3306 --bind-address=127.0.0.1 --pid-file="$state/run/mariadb.pid" \
            --log-error="$state/log/mariadb.log" --skip-name-resolve &
    fi
    for _ in $(seq 60); do
        mariadb --socket="$state/run/mysqld.sock" -e 'select 1' >/dev/null 2>&1 && break
        sleep 0.5
    done
    mariadb --socket="$state/run/mysqld.sock" <<'SQL'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'edpo-slurm';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'edpo-slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
}

wait_for() {
    local what=$1 tries=$2
    shift 2
    for _ in $(seq "$tries"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    log "$what did not come up; the logs:"
    tail -n 30 "$state"/log/*.log >&2 || true
    return 1
}

start() {
    install
    configure
    export SLURM_CONF="$conf"
    start_munge
    start_mariadb
    pid_alive "$state/run/slurmdbd.pid" || slurmdbd
    wait_for slurmdbd 60 sacctmgr -i show cluster
    # The cluster must exist in the accounting database before slurmctld registers.
    sacctmgr -i add cluster edpo >/dev/null 2>&1 || true
    pid_alive "$state/run/slurmctld.pid" || slurmctld -i
    wait_for slurmctld 60 scontrol ping
    pid_alive "$state/run/slurmd.pid" || slurmd
    local host
    host=$(hostname -s)
    for _ in $(seq 120); do
        st=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
        case "$st" in
        idle*) break ;;
        down* | drain*) scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    st=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    if [[ "$st" != idle* ]]; then
        log "node $host is '$st', not idle; the logs:"
        tail -n 30 "$state"/log/*.log >&2 || true
        exit 1
    fi
    log "up: node $host idle, $(nproc) CPUs; export SLURM_CONF=$conf"
}

stop() {
    export SLURM_CONF="$conf"
    for d in slurmd slurmctld slurmdbd mariadb; do
        if pid_alive "$state/run/$d.pid"; then
            kill "$(cat "$state/run/$d.pid")" 2>/dev/null || true
        fi
    done
    for _ in $(seq 40); do
        alive=0
        for d in slurmd slurmctld slurmdbd mariadb; do pid_alive "$state/run/$d.pid" && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.25
    done
    pkill -x munged 2>/dev/null || true
    log "stopped"
}

case "$action" in
start) start ;;
stop) stop ;;
env) echo "export SLURM_CONF=$conf" ;;
*)
    echo "usage: $0 start|stop|env [STATE_DIR]" >&2
    exit 2
    ;;
esac
