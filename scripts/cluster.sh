#!/usr/bin/env bash
# A cluster on one machine: N network namespaces as nodes, each with its own address, host name and
# a NIC shaped to a rate, joined by a bridge (the switch) in a namespace of its own; Hydra and,
# with --slurm, a real multi-node Slurm across them. Needs root and iproute2 (`ip`, `tc`).
#
#   scripts/cluster.sh up --nodes N [--rate RATE] [--slurm]   make the nodes (RATE: a tc rate, 1gbit)
#   scripts/cluster.sh mpiexec [--cyclic|--ppn L|--nodes A,B] -n NP ARGS...  Hydra from node0 across the nodes
#   scripts/cluster.sh exec NODE CMD...                        a command inside one node
#   scripts/cluster.sh sbatch|srun|squeue|sinfo|scancel|scontrol ARGS...   Slurm's commands (node0)
#   scripts/cluster.sh nic-bytes                               NODE TX_BYTES RX_BYTES since `up`
#   scripts/cluster.sh link NODE up|down                       a node's cable plugged or pulled
#   scripts/cluster.sh rate NODE RATE                          a node's NIC shaped to RATE (a slower node)
#   scripts/cluster.sh kill NODE [SIGNAL]                      a node's processes (not slurmd) killed
#   scripts/cluster.sh info                                    nodes, rate, addresses, Slurm or not
#   scripts/cluster.sh down                                    remove everything `up` made
#
# Nodes are namespaces node0..node{N-1} on 10.213.0.0/24 (node i is 10.213.0.{i+1}); their NIC is
# eth0, shaped in both directions (the node's egress and the switch port's egress towards it, as a
# full-duplex NIC is) with tbf. Traffic inside a node never touches eth0 (loopback and shared
# memory), so eth0's counters are the node's network bytes. MPI goes over MPICH's ofi netmod with
# libfabric's tcp provider: the mpich wheel's default UCX netmod would move bytes between the
# namespaces through shared memory and never touch the wire.
set -euo pipefail

STATE=${HPC_MOE_CLUSTER_STATE:-/run/hpc-moe-cluster}
SUBNET=10.213.0
SWITCH=hmc-switch
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")

die() { echo "cluster.sh: $*" >&2; exit 2; }

usage() { sed -n '6,16s/^# //p' "${BASH_SOURCE[0]}"; }

can_make_namespaces() {
  [ "$(id -u)" = 0 ] || die "needs root to make network namespaces (running as uid $(id -u))"
  command -v ip >/dev/null || die "needs iproute2's ip (not found)"
  command -v tc >/dev/null || die "needs iproute2's tc (not found)"
  command -v unshare >/dev/null || die "needs util-linux's unshare (not found)"
}

is_up() { [ -f "$STATE/nodes" ]; }
need_up() { is_up || die "no cluster is up (scripts/cluster.sh up --nodes N)"; }
nodes() { cat "$STATE/nodes"; }
node_names() { local i; for ((i = 0; i < $(nodes); i++)); do echo "node$i"; done; }

# Run in node NS as host NS, with the node's hosts file (ip netns exec binds /etc/netns/NS/*).
in_node() {
  local ns=$1; shift
  ip netns exec "$ns" unshare --uts sh -c 'hostname "$0"; exec "$@"' "$ns" "$@"
}

nic_counts() {  # NODE -> "TX RX" of its eth0
  ip netns exec "$1" sh -c 'cat /sys/class/net/eth0/statistics/tx_bytes /sys/class/net/eth0/statistics/rx_bytes' | paste -sd' '
}

cmd_up() {
  local n="" rate="" slurm=0
  while [ $# -gt 0 ]; do
    case $1 in
      --nodes) n=${2:-}; shift 2 ;;
      --rate) rate=${2:-}; shift 2 ;;
      --slurm) slurm=1; shift ;;
      *) die "up: unknown option $1 (up --nodes N [--rate RATE] [--slurm])" ;;
    esac
  done
  [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 64 ] || die "up: --nodes must be 1..64 (got '${n}')"
  [ -z "$rate" ] || [[ $rate =~ ^[0-9]+(\.[0-9]+)?([kmg]?bit|[kmg]?bps)$ ]] \
    || die "up: --rate must be a tc rate such as 1gbit or 100mbit (got '$rate')"
  can_make_namespaces
  is_up && die "a cluster of $(nodes) nodes is already up (scripts/cluster.sh down first)"
  mkdir -p "$STATE"
  : > "$STATE/made"
  ls /dev/shm > "$STATE/shm-before"  # the MPI segments that ranks killed in the nodes leave go at `down`
  # Whatever ends `up` early (a failed command, a refusal) removes what it made.
  trap 'rc=$?; [ $rc = 0 ] || { echo "cluster.sh: up failed; removing what it made" >&2; cmd_down >/dev/null 2>&1; }; exit $rc' EXIT

  ip netns add "$SWITCH"; echo "netns $SWITCH" >> "$STATE/made"
  ip netns exec "$SWITCH" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  ip -n "$SWITCH" link add br0 type bridge
  ip -n "$SWITCH" link set br0 up
  ip -n "$SWITCH" link set lo up
  local i hosts="127.0.0.1 localhost"$'\n'
  for ((i = 0; i < n; i++)); do hosts+="$SUBNET.$((i + 1)) node$i"$'\n'; done
  for ((i = 0; i < n; i++)); do
    local ns=node$i
    ip netns add "$ns"; echo "netns $ns" >> "$STATE/made"
    mkdir -p "/etc/netns/$ns"; echo "etc /etc/netns/$ns" >> "$STATE/made"
    printf '%s' "$hosts" > "/etc/netns/$ns/hosts"
    echo "$ns" > "/etc/netns/$ns/hostname"
    ip link add eth0 netns "$ns" type veth peer name "p$i" netns "$SWITCH"
    ip -n "$SWITCH" link set "p$i" master br0 up
    # IPv4 only: IPv6's neighbour discovery would add its own packets to the NIC's counters.
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    if [ -n "$rate" ]; then
      # burst: what the link may send at once; 512 kB holds a 64 kB TSO segment many times over,
      # so the rate, not the bucket, sets the pace; latency bounds the queue (packets beyond drop).
      ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$rate" burst 512kb latency 50ms
      ip netns exec "$SWITCH" tc qdisc add dev "p$i" root tbf rate "$rate" burst 512kb latency 50ms
    fi
  done
  echo "$rate" > "$STATE/rate"
  echo "$n" > "$STATE/nodes"
  for ns in $(node_names); do echo "$ns $(nic_counts "$ns")"; done > "$STATE/base"
  # The Hydra launcher: Hydra calls it as `launcher [-x] HOST CMD...` (ssh's form; CMD is one
  # shell line) and it runs CMD in that node.
  cat > "$STATE/launcher" <<'EOF'
#!/bin/sh
[ "$1" = "-x" ] && shift
host=$1; shift
exec ip netns exec "$host" unshare --uts sh -c 'hostname "$0"; eval "$1"' "$host" "$*"
EOF
  chmod +x "$STATE/launcher"
  [ "$slurm" = 0 ] || slurm_up
  trap - EXIT
  cmd_info
}

# ---- Slurm: slurmctld in node0 (host name = SlurmctldHost), one slurmd per node ----------------
slurm_up() {
  for t in slurmctld slurmd munged sbatch; do
    command -v "$t" >/dev/null || [ -x "/usr/sbin/$t" ] \
      || die "up --slurm: $t not found (apt-get install slurm-wlm munge)"
  done
  local dir=$STATE/slurm n i
  n=$(nodes)
  mkdir -p "$dir/state" "$dir/log"
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    head -c 1024 /dev/urandom > /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge
  # One munged for the machine: the namespaces share its socket (a file, not a network address).
  munge -n >/dev/null 2>&1 || { munged --force; echo "munged" >> "$STATE/made"; }
  local list; list=$(node_names | paste -sd,)
  {
    echo "ClusterName=hpcmoecluster"
    echo "SlurmctldHost=node0($SUBNET.1)"
    echo "SlurmUser=root"; echo "SlurmdUser=root"; echo "AuthType=auth/munge"
    echo "ProctrackType=proctrack/linuxproc"; echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"; echo "SelectTypeParameters=CR_Core"; echo "MpiDefault=none"
    echo "ReturnToService=2"; echo "KillWait=10"; echo "SlurmdTimeout=30"; echo "InactiveLimit=0"
    # Job ids unique across clusters: srun's PMI names a step by them and MPICH its shared memory
    # after that; a rank killed earlier leaves its segment, which a later job of the same id meets.
    echo "FirstJobId=$(( $(date +%s) % 50000000 + 1000 ))"
    echo "SlurmctldPort=6817"; echo "SlurmdPort=6818"
    echo "StateSaveLocation=$dir/state"
    echo "SlurmdSpoolDir=$dir/spool-%n"; echo "SlurmdPidFile=$dir/slurmd-%n.pid"
    echo "SlurmctldPidFile=$dir/slurmctld.pid"
    echo "SlurmctldLogFile=$dir/log/slurmctld.log"; echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
    # 8 CPUs a node on a 2-core machine: ranks oversubscribe the cores, as the MPI tests do.
    echo "SlurmdParameters=config_overrides"
    for ((i = 0; i < n; i++)); do echo "NodeName=node$i NodeAddr=$SUBNET.$((i + 1)) CPUs=8 State=UNKNOWN"; done
    echo "PartitionName=emu Nodes=$list Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE"
  } > "$dir/slurm.conf"
  echo "slurm $dir" >> "$STATE/made"
  in_node node0 slurmctld -f "$dir/slurm.conf"
  # slurmd under nsenter, not `ip netns exec` (which remounts /sys, and slurmd then fails on its
  # cgroups); a mount namespace of its own gives it (and its jobs) the node's hosts file.
  for ((i = 0; i < n; i++)); do
    nsenter --net="/var/run/netns/node$i" unshare --uts --mount sh -c \
      'hostname "$0"; mount --bind "/etc/netns/$0/hosts" /etc/hosts; exec slurmd -f "$1" -N "$0"' \
      "node$i" "$dir/slurm.conf"
  done
  local deadline=$((SECONDS + 60))
  until [ "$(slurm_cmd sinfo -h -o '%T' | sort -u | paste -sd,)" = "idle" ]; do
    [ $SECONDS -lt $deadline ] || {
      echo "cluster.sh: Slurm did not come up in 60 s: $(tail -n 3 "$dir/log/slurmctld.log" 2>/dev/null)" >&2
      false; }
    sleep 0.5
  done
}

slurm_cmd() {
  [ -f "$STATE/slurm/slurm.conf" ] || die "this cluster has no Slurm (up --nodes N --slurm)"
  # Jobs inherit the submitting environment (sbatch --export=ALL): the wire's netmod goes with it.
  SLURM_CONF=$STATE/slurm/slurm.conf MPIR_CVAR_CH4_NETMOD=${MPIR_CVAR_CH4_NETMOD:-ofi} \
    FI_PROVIDER=${FI_PROVIDER:-tcp} in_node node0 "$@"
}

slurm_down() {
  local dir=$STATE/slurm f
  for f in "$dir"/slurmd-*.pid "$dir/slurmctld.pid"; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  # A job's steps still running in the nodes die with their namespaces' processes below.
}

# ---- MPI ---------------------------------------------------------------------------------------
cmd_mpiexec() {
  need_up
  local cyclic=0 ppn="" np="" a args=() only=""
  case ${1:-} in
    --cyclic) cyclic=1; shift ;;
    --ppn) ppn=${2:-}; shift 2 || true
           [[ $ppn =~ ^[0-9]+$ ]] && [ "$ppn" -ge 1 ] || die "mpiexec: --ppn must be a positive integer" ;;
    --nodes) only=${2:-}; shift 2 || true
             for ns in ${only//,/ }; do need_node mpiexec "$ns"; done ;;
  esac
  args=("$@")
  for ((a = 0; a < ${#args[@]}; a++)); do
    case ${args[a]} in -n|-np) np=${args[a + 1]:-} ;; esac
  done
  [[ $np =~ ^[0-9]+$ ]] && [ "$np" -ge 1 ] || die "mpiexec: give the number of ranks as -n NP"
  local n hosts="" ns per
  n=$(nodes)
  [ -z "$only" ] || n=$(echo "${only//,/ }" | wc -w)
  per=${ppn:-$(( (np + n - 1) / n ))}  # block: node0's ranks first, then node1's, ...
  [ "$cyclic" = 1 ] && per=1  # Hydra deals one rank per host in turn: round-robin
  [ -z "$ppn" ] || [ $(( (np + ppn - 1) / ppn )) -le "$n" ] || die "mpiexec: $np ranks at $ppn a node need more than $n nodes"
  # With --ppn, only the nodes the ranks fill (a job on part of the cluster).
  for ns in ${only:+${only//,/ }} $([ -n "$only" ] || node_names | head -n $(( ppn ? (np + per - 1) / per : n ))); do
    hosts+="${hosts:+,}$ns:$per"
  done
  local mpiexec=${MPIEXEC:-}
  [ -n "$mpiexec" ] || { [ -x "$REPO/.venv/bin/mpiexec" ] && mpiexec=$REPO/.venv/bin/mpiexec; } \
    || mpiexec=$(command -v mpiexec) || die "mpiexec not found (make install, or set MPIEXEC)"
  MPIR_CVAR_CH4_NETMOD=${MPIR_CVAR_CH4_NETMOD:-ofi} FI_PROVIDER=${FI_PROVIDER:-tcp} \
    in_node node0 "$mpiexec" -launcher ssh -launcher-exec "$STATE/launcher" -hosts "$hosts" "$@"
}

need_node() {  # VERB NODE
  [[ ${2:-} =~ ^node[0-9]+$ ]] && [ "${2#node}" -lt "$(nodes)" ] \
    || die "$1: no node '${2:-}' (node0..node$(($(nodes) - 1)))"
}

cmd_exec() {
  need_up; need_node exec "${1:-}"
  local node=$1; shift
  [ $# -gt 0 ] || die "exec: give a command"
  in_node "$node" "$@"
}

cmd_link() {
  need_up; need_node link "${1:-}"
  [[ ${2:-} =~ ^(up|down)$ ]] || die "link: up or down (got '${2:-}')"
  ip -n "$1" link set eth0 "$2"
}

cmd_rate() {  # both directions, as up shapes them; "replace" also works on an unshaped node
  need_up; need_node rate "${1:-}"
  [[ ${2:-} =~ ^[0-9.]+[kmg]?bit$ ]] || die "rate: a tc rate such as 250mbit (got '${2:-}')"
  local i=${1#node}
  ip netns exec "$1" tc qdisc replace dev eth0 root tbf rate "$2" burst 512kb latency 50ms
  ip netns exec "$SWITCH" tc qdisc replace dev "p$i" root tbf rate "$2" burst 512kb latency 50ms
}

cmd_kill() {  # every process of the node but its slurmd, as a node that dies takes its jobs
  need_up; need_node kill "${1:-}"
  local pid sig=${2:-KILL}
  for pid in $(ip netns pids "$1"); do
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmd ] || kill "-$sig" "$pid" 2>/dev/null || true
  done
}

cmd_nic_bytes() {
  need_up
  local ns tx rx btx brx
  for ns in $(node_names); do
    read -r tx rx <<< "$(nic_counts "$ns")"
    read -r _ btx brx <<< "$(grep "^$ns " "$STATE/base")"
    echo "$ns $((tx - btx)) $((rx - brx))"
  done
}

cmd_info() {
  need_up
  local rate; rate=$(cat "$STATE/rate")
  echo "cluster: $(nodes) nodes ($(node_names | paste -sd' ')) on $SUBNET.0/24, NIC ${rate:-unshaped}," \
       "Slurm $([ -f "$STATE/slurm/slurm.conf" ] && echo "up (SLURM_CONF=$STATE/slurm/slurm.conf)" || echo no)"
}

cmd_down() {
  [ -d "$STATE" ] || { echo "cluster.sh: nothing to remove"; return 0; }
  [ "$(id -u)" = 0 ] || die "needs root to remove network namespaces"
  [ -f "$STATE/made" ] && grep -q '^slurm ' "$STATE/made" && slurm_down
  local kind what pid
  # Everything still running inside a node (ranks, daemons) goes with it.
  while read -r kind what; do
    [ "$kind" = netns ] || continue
    for pid in $(ip netns pids "$what" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
  done < "$STATE/made"
  sleep 0.2
  while read -r kind what; do
    [ "$kind" = netns ] || continue
    for pid in $(ip netns pids "$what" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  done < "$STATE/made"
  while read -r kind what; do
    case $kind in
      netns) ip netns del "$what" 2>/dev/null || true ;;
      etc) rm -rf "$what" ;;
      munged) pkill -x munged 2>/dev/null || true ;;
    esac
  done < "$STATE/made"
  local seg
  for seg in /dev/shm/mpich_shm_* /dev/shm/sm_segment.*; do
    [ -e "$seg" ] && ! grep -qxF "${seg#/dev/shm/}" "$STATE/shm-before" 2>/dev/null && rm -f "$seg"
  done
  rm -rf "$STATE"
  echo "cluster.sh: removed"
}

verb=${1:-}; shift || true
case $verb in
  up) cmd_up "$@" ;;
  down) cmd_down ;;
  mpiexec) cmd_mpiexec "$@" ;;
  exec) cmd_exec "$@" ;;
  nic-bytes) cmd_nic_bytes ;;
  link) cmd_link "$@" ;;
  rate) cmd_rate "$@" ;;
  kill) cmd_kill "$@" ;;
  info) cmd_info ;;
  sbatch|srun|squeue|sinfo|scancel|scontrol|sacct) need_up; slurm_cmd "$verb" "$@" ;;
  -h|--help|help) usage ;;
  *) usage >&2; die "unknown verb '${verb}'" ;;
esac
