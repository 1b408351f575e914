#!/bin/bash
# One shardserve-worker per GPU of this pod: rank r listens on 50061 + r (metrics 9401 + r) and
# takes the other arguments given. SIGTERM goes to every rank (each drains); when any rank exits
# the others are stopped, so the pod restarts as a whole: a group is one failure unit.
set -u
ranks=${SHARDSERVE_TP_SIZE:?}
pids=()
for ((r = 0; r < ranks; r++)); do
  shardserve-worker "$@" --rank="$r" --port=$((50061 + r)) --metrics-port=$((9401 + r)) &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
wait -n
status=$?
kill -TERM "${pids[@]}" 2>/dev/null
wait
exit "$status"
