#!/bin/bash
# The one entrypoint of every b2b training job. Modes:
#   batch   the batch shell (exec'd from the sbatch script): derives the head node's address,
#           the port and the world size from SLURM's variables, checks every node, prepares the
#           run directory once, starts one worker per process with srun, and decides the
#           job's fate: finished -> exit 0; stopped by a signal (preemption, time limit)
#           -> scontrol requeue, and the requeued job resumes from the checkpoint.
#   check   node health, one task per node, before training starts.
#   worker  one training process: SLURM's task ids become torch.distributed's env variables.
# Usage (the rendered sbatch script): entrypoint.sh batch RECIPE RUN_DIR [--set KEY=VALUE ...], with B2B_PYTHON set.
set -uo pipefail
EXIT_STOPPED=75  # b2b train's "stopped with a checkpoint, resume me"

case "${1:-batch}" in
worker)
    export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
    export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-1}
    [ -n "${SLURM_GPUS_ON_NODE:-}" ] || export DS_ACCELERATOR=cpu
    exec "$B2B_PYTHON" -m launchers.train --run-dir "$B2B_RUN_DIR" --resume auto
    ;;
check)
    # a node that cannot import the stack, write the run directory or see its GPUs fails the job here
    "$B2B_PYTHON" -c "import torch, deepspeed" 2>/dev/null || { echo "$(hostname): python stack broken"; exit 1; }
    touch "$B2B_RUN_DIR/.node-check-$SLURMD_NODENAME" && rm -f "$B2B_RUN_DIR/.node-check-$SLURMD_NODENAME" \
        || { echo "$SLURMD_NODENAME: cannot write $B2B_RUN_DIR"; exit 1; }
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        found=$(nvidia-smi -L 2>/dev/null | wc -l)
        [ "$found" -ge "$SLURM_GPUS_ON_NODE" ] || { echo "$SLURMD_NODENAME: $found of $SLURM_GPUS_ON_NODE GPUs"; exit 1; }
    fi
    echo "$SLURMD_NODENAME: healthy"
    exit 0
    ;;
esac

recipe=$2
export B2B_RUN_DIR=$3
shift 3  # the rest: --set overrides for b2b train
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_ADDR=$(scontrol show node "$head" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR=${MASTER_ADDR:-$head} MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
echo "b2b: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST;" \
     "head $MASTER_ADDR:$MASTER_PORT, $SLURM_NTASKS process(es)"

srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 bash "$0" check || { echo "b2b: node check failed"; exit 1; }
# one live run per directory (launchers/runlock.py): held by this shell, refreshed every 10 s in the
# background, released however the job ends; the b2b train below inherits it
B2B_RUN_LOCK=$("$B2B_PYTHON" -m launchers.runlock acquire "$B2B_RUN_DIR" $$) || exit 2
export B2B_RUN_LOCK
(while sleep 10; do touch -c "$B2B_RUN_DIR/lock"; done) &
heartbeat=$!
trap 'kill $heartbeat 2>/dev/null; "$B2B_PYTHON" -m launchers.runlock release "$B2B_RUN_DIR" "$B2B_RUN_LOCK"' EXIT
# checks, data, growth and the run directory, once, with the world size of the whole job
"$B2B_PYTHON" -m launchers.cli train "$recipe" "$@" --procs "$SLURM_NTASKS" \
    --resume auto --prepare-only || exit $?

# srun forwards the signal to every worker; they checkpoint at the end of the step and exit
srun --kill-on-bad-exit=1 bash "$0" worker &
workers=$!
trap 'echo "b2b: signal received, stopping the workers"; kill -USR1 $workers' USR1 TERM
while kill -0 "$workers" 2>/dev/null; do wait "$workers"; done  # a trap interrupts wait
wait "$workers"  # the exit status, kept by bash
code=$?

# What the workers committed decides, not their exit codes alone: rank 0 writes status.json after
# the last checkpoint (and --prepare-only removed any older one), so a worker that died in its
# teardown after that does not fail a good run or leave a stopped one unrequeued.
"$B2B_PYTHON" -m launchers.submit outcome "$B2B_RUN_DIR"
outcome=$?
if [ "$outcome" -ne 1 ] && [ "$code" -ne 0 ]; then
    echo "b2b: the workers exited with $code after writing their status; going by the status"
fi
if [ "$outcome" -eq "$EXIT_STOPPED" ]; then
    echo "b2b: stopped with a checkpoint; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
[ "$outcome" -ne 1 ] && exit "$outcome"
echo "b2b: the workers failed (exit code $code)"
exit $(( code == 0 ? 1 : code ))
