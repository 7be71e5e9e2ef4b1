#!/usr/bin/env bash
# A throw-away SLURM cluster on this one host, for the tests (tests/test_slurm.py) and by hand.
#
# One munged, one slurmctld and one slurmd per emulated node ("multiple slurmd" mode, one TCP port
# each), Debian's slurm-wlm 22.05 and munge, run as root without systemd. Each slurmd runs in its
# own UTS+mount namespace, so `hostname` inside a job names its node and node names resolve (a
# private /etc/hosts); where namespaces are not permitted, the node names are appended to
# /etc/hosts instead (marked, removed by `down`). All state, logs and pid files live under
# $SLURM_CI_DIR. Missing packages are installed with apt-get (see apt_install.sh).
#
#   eval "$(tests/clusters/slurm_local.sh up)"    # prints: export SLURM_CONF=...
#   sbatch --wait slurm/train_48k.sbatch
#   tests/clusters/slurm_local.sh down            # cancels jobs, stops only the daemons it started
#   tests/clusters/slurm_local.sh status | env | purge (down + remove $SLURM_CI_DIR)
#
# Two kinds of node, both in every partition:
#   node1..nodeN  SLURM_CI_NODES (2) × SLURM_CI_CPUS CPUs (nproc) and SLURM_CI_GPUS fake GPUs (0)
#   gpu1..gpuM    SLURM_CI_GPU_NODES (0) × SLURM_CI_GPU_NODE_CPUS CPUs (SLURM_CI_CPUS) and
#                 SLURM_CI_GPU_NODE_GPUS fake GPUs (8)
# The scheduler prefers node* (lower Weight), so a job that asks for no GPUs lands there and a
# job that asks for more GPUs than node* have lands on gpu*. Fake GPUs are GRES whose device
# files are links to /dev/null: SLURM schedules them and sets CUDA_VISIBLE_DEVICES, nothing of
# CUDA is there. CPU counts may exceed the real cores.
#
# Other knobs: SLURM_CI_DIR (/tmp/mf2-slurm), SLURM_CI_MEM_MB (90% of RAM per node),
# SLURM_CI_PARTITIONS ("debug"; the first is the default), SLURM_CI_CTLD_PORT (16817),
# SLURM_CI_NODE_PORT_BASE (17000: slurmd ports base+1...), SLURM_CI_NS (auto|1|0),
# SLURM_CI_INSTALL (1: install missing packages).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
D=${SLURM_CI_DIR:-/tmp/mf2-slurm}
NODES=${SLURM_CI_NODES:-2}
CPUS=${SLURM_CI_CPUS:-$(nproc)}
GPUS=${SLURM_CI_GPUS:-0}
GNODES=${SLURM_CI_GPU_NODES:-0}
GCPUS=${SLURM_CI_GPU_NODE_CPUS:-$CPUS}
GGPUS=${SLURM_CI_GPU_NODE_GPUS:-8}
MEM=${SLURM_CI_MEM_MB:-$(($(awk '/^MemTotal:/{print $2}' /proc/meminfo) / 1024 * 9 / 10))}
PARTS=${SLURM_CI_PARTITIONS:-debug}
CTLD_PORT=${SLURM_CI_CTLD_PORT:-16817}
PBASE=${SLURM_CI_NODE_PORT_BASE:-17000}
NS=${SLURM_CI_NS:-auto}
INSTALL=${SLURM_CI_INSTALL:-1}
CONF=$D/etc/slurm.conf
MSOCK=$D/munge/run/munge.socket
HOSTS_MARK="# slurm-ci:$D"
export SLURM_CONF=$CONF
export PATH=$PATH:/usr/sbin:/sbin

log() { echo "[slurm-ci] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[[ $D == /?*/?* ]] || die "SLURM_CI_DIR must be an absolute path at least two levels deep (got '$D')"

node_names() {
  local i
  for ((i = 1; i <= NODES; i++)); do echo "node$i"; done
  for ((i = 1; i <= GNODES; i++)); do echo "gpu$i"; done
}
range() { if (($2 == 1)); then echo "${1}1"; else echo "$1[1-$2]"; fi; } # range node 3 -> node[1-3]
total_nodes() { echo $((NODES + GNODES)); }

# pid_alive PIDFILE COMM: the pid in PIDFILE runs (not a zombie) and is COMM
pid_alive() {
  local f=$1 comm=$2 p
  [[ -s $f ]] || return 1
  p=$(<"$f")
  [[ $p =~ ^[0-9]+$ ]] && proc_is "$p" "$comm"
}

proc_is() {
  [[ -r /proc/$1/comm && $(</proc/"$1"/comm) == "$2" ]] || return 1
  local st
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $st && $st != Z ]]
}

# TERM, wait up to 15 s, then KILL; only the pid in the file (the daemons remove their own pid
# file early on shutdown, so poll the pid).
stop_pidfile() {
  local f=$1 comm=$2 p i
  if pid_alive "$f" "$comm"; then
    p=$(<"$f")
    log "stopping $comm (pid $p)"
    kill -TERM "$p" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do proc_is "$p" "$comm" || break; sleep 0.1; done
    if proc_is "$p" "$comm"; then
      log "  $comm pid $p still alive, KILL"
      kill -KILL "$p" 2>/dev/null || true
      sleep 0.5
    fi
  fi
  rm -f "$f"
}

install_pkgs() {
  [[ $INSTALL == 1 ]] || {
    for c in slurmctld slurmd sbatch munged; do command -v $c >/dev/null || die "$c is missing and SLURM_CI_INSTALL=0"; done
    return 0
  }
  # shellcheck source=apt_install.sh
  source "$HERE/apt_install.sh"
  apt_install slurmctld slurmd sbatch srun scontrol munged munge -- slurmctld slurmd slurm-client munge \
    2>>"$D/log/install.log" || die "$(tail -1 "$D/log/install.log")"
}

start_munge() {
  mkdir -p "$D/munge/etc" "$D/munge/lib" "$D/munge/log" "$D/munge/run"
  chmod 755 "$D" "$D/munge" "$D/munge/run" # the socket's folder must be traversable by all
  chmod 700 "$D/munge/etc" "$D/munge/lib"
  local key=$D/munge/etc/munge.key i
  if [[ ! -s $key ]]; then
    if command -v mungekey >/dev/null 2>&1; then mungekey -c -k "$key" >&2
    else dd if=/dev/urandom of="$key" bs=1 count=1024 status=none; fi
  fi
  chmod 600 "$key"
  if ! pid_alive "$D/munge/run/munged.pid" munged; then
    rm -f "$MSOCK" "$MSOCK.lock"
    munged --key-file="$key" --socket="$MSOCK" --pid-file="$D/munge/run/munged.pid" \
      --log-file="$D/munge/log/munged.log" --seed-file="$D/munge/lib/munged.seed"
  fi
  for ((i = 0; i < 50; i++)); do
    munge -n -S "$MSOCK" 2>/dev/null | unmunge -S "$MSOCK" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged not answering on $MSOCK (see $D/munge/log/munged.log)"
}

# node_line NAMEPREFIX COUNT CPUS GPUS WEIGHT FIRST_PORT
node_line() {
  local ports=$6 gres=""
  (($2 > 1)) && ports="$6-$(($6 + $2 - 1))"
  (($4 > 0)) && gres=" Gres=gpu:$4"
  echo "NodeName=$(range "$1" "$2") NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$ports CPUs=$3" \
    "RealMemory=$MEM Weight=$5$gres State=UNKNOWN"
}

write_conf() {
  local host
  host=$(hostname -s)
  {
    cat <<EOF
# generated by tests/clusters/slurm_local.sh; do not edit (SLURM_CI_NS=$NS)
ClusterName=ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets the requeue delay (default 120 s, here about 11 s)
AuthInfo=socket=$MSOCK,cred_expire=10
SlurmctldPort=$CTLD_PORT
SlurmdPort=$PBASE
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
PlugStackConfig=$D/etc/plugstack.conf
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.log
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
# re-evaluate pending jobs every 2 s (a requeued job restarts about 12 s after its requeue)
SchedulerParameters=bf_interval=2,sched_interval=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
# MinJobAge <= 4 keeps 'sbatch --wait' polling every 2 s (else 2, 8, then 32 s)
MinJobAge=4
EOF
    ((GPUS + GNODES > 0)) && echo "GresTypes=gpu"
    ((NODES > 0)) && node_line node "$NODES" "$CPUS" "$GPUS" 1 $((PBASE + 1))
    ((GNODES > 0)) && node_line gpu "$GNODES" "$GCPUS" "$GGPUS" 10 $((PBASE + NODES + 1))
    local p def=YES
    for p in $PARTS; do
      echo "PartitionName=$p Nodes=ALL Default=$def MaxTime=INFINITE State=UP"
      def=NO
    done
  } >"$CONF.new"
  {
    # gres needs File=; any character device will do
    ((NODES > 0 && GPUS > 0)) && echo "NodeName=$(range node "$NODES") Name=gpu File=$D/dev/nvidia[0-$((GPUS - 1))]"
    ((GNODES > 0)) && echo "NodeName=$(range gpu "$GNODES") Name=gpu File=$D/dev/nvidia[0-$((GGPUS - 1))]"
    true
  } >"$CONF.new.gres"
}

ns_usable() {
  [[ $NS == 0 ]] && return 1
  command -v unshare >/dev/null 2>&1 || return 1
  if unshare --uts --mount --propagation private \
    sh -c "hostname slurm-ci-probe && mount --bind '$D/etc/hosts' /etc/hosts" >/dev/null 2>&1; then
    return 0
  fi
  [[ $NS == 1 ]] && log "WARNING: SLURM_CI_NS=1 but unshare --uts --mount is not permitted; falling back"
  return 1
}

etc_hosts_add() { # without namespaces only: make the node names resolvable system-wide
  local n need=()
  for n in $(node_names); do getent hosts "$n" >/dev/null 2>&1 || need+=("$n"); done
  ((${#need[@]})) || return 0
  if [[ -w /etc/hosts ]]; then
    log "appending '127.0.0.1 ${need[*]}' to /etc/hosts (removed by 'down')"
    echo "127.0.0.1 ${need[*]} $HOSTS_MARK" >>/etc/hosts
  else
    log "WARNING: node names ${need[*]} do not resolve (no namespaces, /etc/hosts read-only)"
  fi
}

etc_hosts_del() {
  [[ -w /etc/hosts ]] && grep -qF "$HOSTS_MARK" /etc/hosts || return 0
  local t
  t=$(mktemp)
  grep -vF "$HOSTS_MARK" /etc/hosts >"$t" || true
  cat "$t" >/etc/hosts # in place: docker bind-mounts /etc/hosts
  rm -f "$t"
}

all_alive() {
  local n
  pid_alive "$D/munge/run/munged.pid" munged || return 1
  pid_alive "$D/run/slurmctld.pid" slurmctld || return 1
  for n in $(node_names); do pid_alive "$D/run/slurmd-$n.pid" slurmd || return 1; done
}

wait_nodes_idle() { # $1: timeout in half-seconds
  local i idle st
  for ((i = 0; i < ${1:-120}; i++)); do
    idle=$(sinfo -h -N -p "${PARTS%% *}" -o '%N %T' 2>/dev/null | awk '$2 ~ /^(idle|mixed|allocated)/' | wc -l)
    ((idle >= $(total_nodes))) && return 0
    if ((i == 20 || i == 60)); then # stale down/drain state: try to resume
      st=$(sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 ~ /down|drain|fail/ {print $1}' | paste -sd, -)
      [[ -n $st ]] && scontrol update NodeName="$st" State=RESUME >&2 2>/dev/null || true
    fi
    sleep 0.5
  done
  return 1
}

do_down() {
  local n i
  if pid_alive "$D/run/slurmctld.pid" slurmctld && [[ -s $CONF ]]; then
    if [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
      log "cancelling remaining jobs"
      squeue -h -o %i | xargs -r scancel 2>/dev/null || true
      for ((i = 0; i < 60; i++)); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.5; done
    fi
  fi
  for n in "$D"/run/slurmd-*.pid; do [[ -e $n ]] && stop_pidfile "$n" slurmd; done
  stop_pidfile "$D/run/slurmctld.pid" slurmctld
  stop_pidfile "$D/munge/run/munged.pid" munged
  etc_hosts_del
  if [[ -d $D/spool ]] && compgen -G "$D/spool/*/*_[0-9]*" >/dev/null; then
    log "WARNING: step sockets left in $D/spool (a slurmstepd may still be running)"
  fi
}

do_up() {
  [[ $(id -u) == 0 ]] || die "must run as root (slurmd, slurmctld and munged run as root here)"
  mkdir -p "$D/etc" "$D/log" "$D/run" "$D/state" "$D/spool"
  install_pkgs
  write_conf
  if all_alive && cmp -s "$CONF.new" "$CONF" && cmp -s "$CONF.new.gres" "$D/etc/gres.conf"; then
    rm -f "$CONF.new" "$CONF.new.gres"
    if wait_nodes_idle 20; then
      log "already running"
      echo "export SLURM_CONF=$CONF"
      return 0
    fi
    log "running but nodes not idle: restarting"
    write_conf
  fi
  do_down # a partial or changed set-up: restart cleanly (munge key and logs kept)
  mv "$CONF.new" "$CONF"
  mv "$CONF.new.gres" "$D/etc/gres.conf"
  : >"$D/etc/plugstack.conf"
  rm -rf "${D:?}/state" "${D:?}/spool" "${D:?}/dev"
  mkdir -p "$D/state" "$D/spool" "$D/dev"
  local n i
  for n in $(node_names); do mkdir -p "$D/spool/$n"; done
  for ((i = 0; i < (GPUS > GGPUS ? GPUS : GGPUS); i++)); do ln -s /dev/null "$D/dev/nvidia$i"; done
  { cat /etc/hosts; echo "127.0.0.1 $(node_names | paste -sd' ' -)"; } >"$D/etc/hosts"
  chmod 644 "$CONF" "$D/etc/hosts" "$D/etc/plugstack.conf" "$D/etc/gres.conf"

  start_munge
  log "starting slurmctld (port $CTLD_PORT)"
  slurmctld -f "$CONF"
  for ((i = 0; i < 100; i++)); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
  scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld not up; see $D/log/slurmctld.log"

  local use_ns=0
  if ns_usable; then use_ns=1; else etc_hosts_add; fi
  for n in $(node_names); do
    log "starting slurmd -N $n (namespaces=$use_ns)"
    if ((use_ns)); then
      unshare --uts --mount --propagation private \
        sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -f "$3" -N "$1"' \
        sh "$n" "$D/etc/hosts" "$CONF"
    else
      slurmd -f "$CONF" -N "$n"
    fi
  done
  wait_nodes_idle 120 || { sinfo -N >&2 || true; die "nodes not idle after 60 s; see $D/log/"; }
  log "cluster up: $(sinfo -h -N -o '%N %c %G %T' | paste -sd';' -)"
  echo "export SLURM_CONF=$CONF"
}

case ${1:-up} in
  up) do_up ;;
  down) do_down ;;
  purge) do_down; rm -rf "${D:?}" ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  status)
    for f in "$D/munge/run/munged.pid" "$D/run/slurmctld.pid" "$D"/run/slurmd-*.pid; do
      [[ -e $f ]] && echo "$(basename "$f" .pid): $(<"$f")"
    done
    sinfo -N 2>/dev/null || echo "slurmctld not reachable"
    squeue 2>/dev/null || true
    ;;
  *) echo "usage: $0 up|down|purge|status|env" >&2; exit 2 ;;
esac
