#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing `hydra/launcher=submitit_slurm` against a real scheduler.
#
#   scripts/slurm_local.sh start   # as root: install munge + slurm from Debian's packages if missing, write the
#                                  # config under $SLURM_LOCAL_DIR, start munged, slurmctld, slurmd, wait until idle
#   scripts/slurm_local.sh stop    # stop the three daemons by their pid files
#   scripts/slurm_local.sh status  # sinfo
#
# Idempotent: `start` on a running cluster only checks it is up. The config (DESIGN §10): root runs everything,
# munge auth, no cgroups, no accounting, one default partition holding this node with all its CPUs and 80% of RAM.
# Clients find it through /etc/slurm/slurm.conf, a symlink to ours (never over an existing real config).
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/mergebench-slurm}"
CONF="$DIR/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
NODE="$(hostname -s)"

log() { echo "slurm_local: $*" >&2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  [ "${#missing[@]}" = 0 ] && return
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
}

write_config() {
  mkdir -p "$DIR"/{state,spool,log,run}
  local mem_mb
  mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
  cat >"$CONF" <<EOF
ClusterName=mergebench
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=$NODE CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  mkdir -p "$(dirname "$ETC_CONF")"
  if [ -L "$ETC_CONF" ] || [ ! -e "$ETC_CONF" ]; then
    ln -sfn "$CONF" "$ETC_CONF"
  elif [ "$(readlink -f "$ETC_CONF")" != "$(readlink -f "$CONF")" ]; then
    log "$ETC_CONF exists and is not ours: clients need SLURM_CONF=$CONF"
  fi
}

node_state() { SLURM_CONF="$CONF" sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -1; }

start() {
  [ "$(id -u)" = 0 ] || { log "start needs root (it installs packages and runs the daemons as root)"; exit 1; }
  install_packages
  write_config
  [ -s /etc/munge/munge.key ] || mungekey -c
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  if ! alive "$DIR/run/munged.pid"; then
    munged --force --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
      --seed-file="$DIR/state/munged.seed"
  fi
  alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF"
  alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF"
  local state=""
  for _ in $(seq 1 60); do
    state="$(node_state)"
    case "$state" in
      idle | mix | alloc) log "node $NODE is $state (config $CONF, logs $DIR/log)"; return 0 ;;
      drain* | down*) SLURM_CONF="$CONF" scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
  done
  log "node $NODE did not become idle (state: ${state:-unknown}); see $DIR/log"
  exit 1
}

stop() {
  local name
  for name in slurmd slurmctld munged; do
    if alive "$DIR/run/$name.pid"; then
      kill "$(cat "$DIR/run/$name.pid")"
      for _ in $(seq 1 20); do alive "$DIR/run/$name.pid" || break; sleep 0.5; done
      log "stopped $name"
    fi
    rm -f "$DIR/run/$name.pid"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF="$CONF" sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
