#!/bin/bash
# A confirm seed whose machine vanishes (kill -9) resumes on another machine sharing the MLflow server.
# Two "machines" are two UTS namespaces (hostname machine-a / machine-b, needs root) with separate
# checkpoint folders; they share only the tracking server, as two hosts would. Real CIFAR-10.
# Run from the repository root: bash docs/machine_lost/demo.sh > docs/machine_lost/output.txt
set -um  # -m: each background job in its own process group, so kill -- -PID ends the server and its workers
BENCH="$PWD/.venv/bin/python -m bench.cli"
work=$(mktemp -d); port=5088; uri=http://127.0.0.1:$port
export BENCH_DATA_DIR=${BENCH_DATA_DIR:-$PWD/../shared/data/cifar10} MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
ln -s "$PWD/experiments" "$work/experiments"; cd "$work"
curl -sf $uri/health > /dev/null && { echo "port $port is taken: stop that server first"; exit 1; }
"${BENCH%% *}" -m mlflow server --host 127.0.0.1 --port $port --workers 1 --backend-store-uri "sqlite:///$work/server.db" \
  --serve-artifacts --artifacts-destination "$work/artifacts" > server.log 2>&1 &
server=$!
until curl -sf $uri/health > /dev/null; do sleep 1; done
say() { echo; echo "\$ $*"; }
on() {  # on HOST CMD...: run a bench command as machine HOST with its own checkpoint folder
  local host=$1; shift
  unshare -u sh -c "hostname $host; BENCH_CHECKPOINT_DIR=$work/$host-checkpoints exec $BENCH $*"
}
SUBSET="--set train_subset=15000 --threads 1 --tracking-uri $uri"
CONFIRM="confirm --norm bn --seeds 1 --epochs 12 $SUBSET"

say "bench tune --norm bn --trials 1 --tune-epochs 1 $SUBSET"
$BENCH tune --norm bn --trials 1 --tune-epochs 1 $SUBSET 2>&1 | tail -n 2

say "[machine-a] bench $CONFIRM &"
touch a.log
on machine-a $CONFIRM > a.log 2>&1 &
a=$!
until grep -q "epoch   2/12" a.log; do sleep 1; done
cat a.log | grep -v "^\s*$" | tail -n 4

say "[machine-b] bench $CONFIRM    # while machine-a trains"
on machine-b $CONFIRM 2>&1 | grep -E "skipped|to run|confirm run"

done_epochs=$(grep -c "epoch " a.log)
until [ "$(grep -c "epoch " a.log)" -gt "$done_epochs" ]; do sleep 1; done  # the next epoch after machine-b looked
say "kill -9 machine-a    # mid-run: the machine vanishes, its run stays RUNNING"
kill -9 -$a; wait $a 2> /dev/null
grep "epoch" a.log | tail -n 1

say "[machine-b] bench $CONFIRM    # at once: the heartbeat is fresh, machine-a may be alive"
on machine-b $CONFIRM 2>&1 | grep -E "skipped|to run|confirm run"

say "[machine-b] BENCH_STALE_MINUTES=0.5 bench $CONFIRM    # after 30 s of silence"
sleep 30
BENCH_STALE_MINUTES=0.5 on machine-b $CONFIRM 2>&1 | grep -E "resuming|epoch|test acc|confirm run"

say "the run in MLflow"
"${BENCH%% *}" - "$uri" <<'PY'
import sys, mlflow
mlflow.set_tracking_uri(sys.argv[1])
client = mlflow.MlflowClient()
[run] = [r for r in mlflow.search_runs(experiment_names=["bn"], filter_string="tags.`bench.kind` = 'confirm'", output_format="list")]
history = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))
print(f"run {run.info.run_id}: {run.info.status}, worker {run.data.tags['bench.worker'].split(':')[0]}, "
      f"resumed after epoch {run.data.tags['bench.resumed_after_epoch']}, val_acc logged at epochs {history}, "
      f"test_acc {run.data.metrics['test_acc']:.4f}, checkpoint artifacts left {len(client.list_artifacts(run.info.run_id, 'checkpoint'))}")
PY
echo "checkpoint files left: machine-a $(ls $work/machine-a-checkpoints | grep -c pt) (its lost local copy), machine-b $(ls $work/machine-b-checkpoints | grep -c pt)"

say "[machine-a] bench ${CONFIRM/--seeds 1/--seed 1} & [machine-b] the same, started together"
on machine-a ${CONFIRM/--seeds 1/--seed 1} > a1.log 2>&1 &
a1=$!
on machine-b ${CONFIRM/--seeds 1/--seed 1} > b1.log 2>&1
wait $a1
grep -hE "skipped|test acc" a1.log b1.log | sed -E 's/ +[0-9]+s  run/  run/'
"${BENCH%% *}" - "$uri" <<'PY'
import sys, mlflow
mlflow.set_tracking_uri(sys.argv[1])
runs = mlflow.search_runs(experiment_names=["bn"], filter_string="tags.`bench.seed` = '1'", output_format="list",
                          run_view_type=mlflow.entities.ViewType.ALL)
print("seed 1 runs in MLflow:", [(r.data.tags["bench.worker"].split(":")[0], r.info.status, r.info.lifecycle_stage) for r in runs])
PY

say "the same study and seed, never interrupted, in a store of its own"
mkdir plain && cd plain && ln -s "$work/experiments" experiments  # its own Optuna journal too
PLAIN="--set train_subset=15000 --threads 1"
$BENCH tune --norm bn --trials 1 --tune-epochs 1 $PLAIN > /dev/null 2>&1
$BENCH confirm --norm bn --seeds 1 --epochs 12 $PLAIN 2>&1 | grep "test acc"
kill -- -$server
[ -n "${KEEP:-}" ] && echo "kept $work" || rm -rf "$work"
