#!/usr/bin/env bash
# What each task of slurm/train_48k.sbatch runs; not meant to be called by hand.
#
#   launch.sh rank PYTHON launcher/train.py ARGS...             srun mode: one task per rank
#   launch.sh node PYTHON DEEPSPEED LAUNCHER_ARGS... SCRIPT...  deepspeed mode: one task per node;
#       adds this node's --node_rank and a hostfile built from the job's node list
#       (slots=MF2_RANKS_PER_NODE), plus --include with the GPUs SLURM gave this node when they are
#       not 0..n-1 (DeepSpeed would otherwise number them from 0: launcher/dist/gpu.py)
#
# Both print who they are (node, host, ranks), so a job's log shows that every node took part.
set -euo pipefail

# srun delivers a preemption notice (USR1) to every process of the step, not only to the ranks.
# The ranks install their own handler (launcher/training/preempt.py); everything else started from here
# (the deepspeed launcher's two processes, compilers it spawns before that handler exists) must
# ignore the notice rather than die of it. An ignored disposition survives exec; a handler does not.
trap '' USR1

mode=${1:?usage: launch.sh rank|node COMMAND...}
shift
host=$(hostname)
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

case $mode in
  rank)
    echo "[mf2-slurm] task: rank ${SLURM_PROCID}/${SLURM_NTASKS} local ${SLURM_LOCALID} node ${SLURM_NODEID}/${nodes}" \
      "host ${host} (SLURM_NODEID=${SLURM_NODEID} SLURMD_NODENAME=${SLURMD_NODENAME:-?})"
    exec "$@"
    ;;
  node)
    per_node=${MF2_RANKS_PER_NODE:?MF2_RANKS_PER_NODE is not set (it comes from train_48k.sbatch)}
    python=$1 launcher=$2
    shift 2
    first=$((SLURM_NODEID * per_node))
    # Node-local, so the launcher does not depend on the shared file system for it.
    hostfile=${TMPDIR:-/tmp}/mf2-hostfile.${SLURM_JOB_ID}.${SLURM_NODEID}
    include=$("$python" -m launcher.hostfile "$hostfile" --node_index "$SLURM_NODEID" \
      --hosts "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)" --ranks_per_node "$per_node")
    echo "[mf2-slurm] task: deepspeed launcher node ${SLURM_NODEID}/${nodes} host ${host} ranks ${first}..$((first + per_node - 1))" \
      "of $((nodes * per_node)) (SLURM_NODEID=${SLURM_NODEID} SLURMD_NODENAME=${SLURMD_NODENAME:-?}" \
      "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}) ${include}"
    exec "$launcher" --no_ssh --node_rank="$SLURM_NODEID" --hostfile="$hostfile" ${include:+"$include"} "$@"
    ;;
  *)
    echo "launch.sh: unknown mode '$mode' (rank or node)" >&2
    exit 2
    ;;
esac
