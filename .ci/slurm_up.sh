#!/usr/bin/env bash
# Start a single-node SLURM 22.05 (Debian 12) with accounting (slurmdbd + MariaDB), without systemd. Run as root.
# Idempotent: installs the packages once, (re)writes the config, starts only the daemons that are not running.
# Recipe and timings: docs/cluster.md ("A test cluster on one machine"). Stop it with .ci/slurm_down.sh.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "slurm_up.sh: needs root" >&2; exit 1; }
H=$(hostname -s)
export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  echo "slurm_up: installing munge, slurm and mariadb (apt, ~30 s)"
  apt-get update -qq
  apt-get install -y -qq munge slurmctld slurmd slurm-client slurmdbd mariadb-server >/dev/null
fi
grep -qE "[[:space:]]${H}([[:space:]]|\$)" /etc/hosts || echo "127.0.0.1 ${H}" >> /etc/hosts

# --- munge (the Debian package generates /etc/munge/munge.key on install)
[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; }
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
if ! { [ -S /run/munge/munge.socket.2 ] && munge -n >/dev/null 2>&1; }; then runuser -u munge -- /usr/sbin/munged; fi
munge -n | unmunge >/dev/null

# --- slurm.conf
mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
chown slurm:slurm /var/lib/slurm/slurmctld /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=${H}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,preempt_send_user_signal
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
# a requeued job waits cred_expire seconds (default 120) before it may start again
AuthInfo=cred_expire=10
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
KillWait=30
MinJobAge=300
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/lib/slurm/slurmd
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${H} NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$(( $(free -m | awk '/^Mem:/{print $2}') * 85 / 100 )) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=high  Nodes=ALL Default=NO  MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() { for _ in $(seq 150); do eval "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "slurm_up: timed out waiting for: $1" >&2; return 1; }

# --- MariaDB + slurmdbd (sacct works: submitit polls job states with sacct)
mkdir -p /run/mysqld && chown mysql:root /run/mysqld
if ! mariadb -e 'select 1' >/dev/null 2>&1; then
  nohup /usr/sbin/mariadbd --user=mysql > /var/log/slurm/mariadb.out 2>&1 &
  echo $! > /run/mariadbd-manual.pid
  wait_for "mariadb -e 'select 1'"
fi
mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
cat > /etc/slurm/slurmdbd.conf <<'CONF'
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
DebugLevel=info
CONF
chown slurm:slurm /etc/slurm/slurmdbd.conf; chmod 600 /etc/slurm/slurmdbd.conf
alive /run/slurmdbd.pid || /usr/sbin/slurmdbd
wait_for "sacctmgr -n list cluster"
sacctmgr -n list cluster format=cluster | grep -qw local || sacctmgr -i add cluster local >/dev/null

# --- controller and node daemons
alive /run/slurmctld.pid || /usr/sbin/slurmctld
wait_for "scontrol ping | grep -q UP"
alive /run/slurmd.pid || /usr/sbin/slurmd
# a node drained by an earlier run (e.g. "SlurmdSpoolDir is full" when the disk filled) stays drained across restarts
if sinfo -h -n "$H" -o %T | grep -Eq 'drain'; then
  echo "slurm_up: node $H was drained ($(sinfo -h -n "$H" -o %E)); resuming it" >&2
  scontrol update NodeName="$H" State=RESUME
fi
wait_for "sinfo -h -n $H -o %T | grep -Eqx 'idle|mixed|allocated'"
sinfo
srun -t 1 hostname >/dev/null
echo "slurm_up: SLURM is up (partitions debug, high; node $H)"
