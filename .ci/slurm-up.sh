#!/usr/bin/env bash
# Configures and starts a single-node Slurm on this machine (munge,
# slurmctld, slurmd on 127.0.0.1) for the Slurm pool's tests and benchmark.
# Idempotent: a running, answering Slurm is left as it is. Needs root (the
# daemons run as root: SlurmUser=root). Installs Debian's packages if absent.
#
#   bash .ci/slurm-up.sh          # configure and start; prints the pids
#   bash .ci/slurm-up.sh stop     # stop the daemons this script started
#
# Settings beyond the minimal recipe, and why:
#   MinJobAge=3600        ended jobs stay visible to `scontrol show job` for an
#                         hour: there is no accounting database here, so this
#                         is where the pool reads exit codes and finds a job
#                         again by its key after a Tessera restart.
#   SelectTypeParameters=CR_Core_Memory   memory is a consumable resource, so
#                         `--mem` is honoured by placement (and an impossible
#                         request is refused at submission).
#   SchedulerParameters=sched_min_interval=0,defer_batch=0 ... (see below)
#                         schedule on every submit and completion event.
#   DefMemPerCPU=512      a job that names no memory takes 512 MiB per CPU,
#                         not the whole node.
#   EnforcePartLimits=ALL  a job larger than the partition allows is refused
#                         by sbatch instead of pending forever.
#   KillWait=5, OverTimeLimit=0   a job past its --time gets SIGTERM, then
#                         SIGKILL 5 s later.
#   SlurmdTimeout=30, ReturnToService=2   a restarted slurmd brings the node
#                         back without an admin.
set -euo pipefail

STATE="${TESSERA_SLURM_STATE:-/var/lib/tessera-ci-slurm}"
CONF=/etc/slurm/slurm.conf

if [ "${1:-}" = stop ]; then
  for f in slurmd slurmctld munged; do
    if [ -f "$STATE/$f.pid" ]; then
      pid=$(cat "$STATE/$f.pid")
      kill "$pid" 2>/dev/null || true
      rm -f "$STATE/$f.pid"
    fi
  done
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "slurm-up: needs root (the single-node Slurm runs as root)" >&2
  exit 1
fi

need() { command -v "$1" >/dev/null 2>&1; }
if ! need slurmctld || ! need slurmd || ! need sbatch || ! need munged; then
  echo "== installing slurmctld slurmd slurm-client munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge
fi

if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'; then
  echo "slurm-up: Slurm is already up"
  exit 0
fi

mkdir -p "$STATE" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/slurm /run/munge
host=$(hostname -s)
cpus=$(nproc)
# Leave a little memory to the machine: 3/4 of it, in MiB.
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))

cat > "$CONF" <<EOF
# Written by Tessera's .ci/slurm-up.sh: a single-node Slurm for tests.
ClusterName=tessera-ci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
OverTimeLimit=0
MinJobAge=3600
DefMemPerCPU=512
EnforcePartLimits=ALL
MaxJobCount=100000
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
: > /etc/slurm/cgroup.conf

if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key

if ! pgrep -x munged >/dev/null; then
  # Run as root so this works in containers without the munge user's rights.
  munged --force
  # munged daemonizes; its own pid file names the daemon.
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$STATE/munged.pid"
fi
if ! pgrep -x slurmctld >/dev/null; then
  slurmctld
fi
if ! pgrep -x slurmd >/dev/null; then
  slurmd
fi

for _ in $(seq 1 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "slurm-up: Slurm is up: $(sinfo -h -o '%P %D %c %m %T')"
    exit 0
  fi
  # A node left down by an earlier run comes back here.
  scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
  sleep 1
done
echo "slurm-up: Slurm did not come up; last lines of its logs:" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
