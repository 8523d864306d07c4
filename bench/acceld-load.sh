#!/bin/sh
# Load benchmark of acceld's webhook endpoint: accepted events/s and latency percentiles of
# async Harbor webhook posts on loopback, then a check that no accepted event was lost, also
# across a kill -9 and restart. See bench/README.md.
#
#   bench/acceld-load.sh                  # 30000 events offered at 5000/s on 64 connections
#   RATE=0 bench/acceld-load.sh           # closed loop: as fast as acceld answers
#   EVENTS=50000 CLIENTS=256 RATE=8000 COMMITS=1 bench/acceld-load.sh
set -eu

EVENTS=${EVENTS:-30000}
CLIENTS=${CLIENTS:-64}
RATE=${RATE:-5000}
PORT=${PORT:-27077}
# The task database must be on local disk, where commits really wait for fsync.
WORKDIR=${WORKDIR:-/var/tmp}
AUTH="Bearer bench"
# COMMITS=1 logs every task database commit, for the summary at the end (costs a little).
if [ -n "${COMMITS:-}" ]; then
    export RUST_LOG="${RUST_LOG:-info},accel::pipeline::tasks=debug"
fi
# Nothing listens on the discard port: every conversion fails at once with a refused
# connection, and its retry waits an hour, so only accepting and storing events is measured.
REGISTRY=127.0.0.1:9

cd "$(dirname "$0")/.."
cargo build --release --quiet --bin acceld --example acceld_load
bin=${CARGO_TARGET_DIR:-target}/release
# ACCELD=path runs another build of acceld, e.g. to compare with an earlier commit.
acceld=${ACCELD:-$bin/acceld}
work=$(mktemp -d "$WORKDIR/acceld-load.XXXXXX")
pid=
cleanup() {
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "kept $work (acceld.log, tasks.redb)"; else rm -rf "$work"; fi
}
trap cleanup EXIT INT TERM

cat > "$work/pipelines.yaml" <<YAML
server: { listen: "127.0.0.1:$PORT", auth_header: "$AUTH", shutdown_grace_secs: 0 }
store: { kind: embedded, path: "$work/store" }
registries: { "$REGISTRY": {} }
tasks: { path: "$work/tasks.redb", queue_size: 1000000, max_attempts: 100, retry_backoff_secs: 3600, retry_backoff_max_secs: 3600 }
sources: { harbor: { kind: harbor } }
pipelines:
  - name: load
    sources: [harbor]
    concurrency: 1
    match: { repositories: ["library/load"] }
    convert: [{ driver: estargz }]
YAML

start() {
    "$acceld" --config "$work/pipelines.yaml" 2>>"$work/acceld.log" &
    pid=$!
    i=0
    until curl -sf -H "Authorization: $AUTH" "http://127.0.0.1:$PORT/api/v1/health" >/dev/null; do
        i=$((i + 1))
        if [ $i -gt 100 ] || ! kill -0 "$pid" 2>/dev/null; then
            echo "acceld did not start:" >&2
            cat "$work/acceld.log" >&2
            exit 1
        fi
        sleep 0.1
    done
}

# CPU seconds (user + system) acceld has used so far, and its task database writer thread.
cpu() {
    awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$pid/stat"
}
writer_cpu() {
    for t in /proc/$pid/task/*; do
        if [ "$(cat "$t/comm")" = task-db-writer ]; then
            awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "$t/stat"
            return
        fi
    done
    echo 0
}

# p50/p90/p99/max of the numbers on stdin.
percentiles() {
    sort -n | awk '{v[NR] = $1} END {
        if (NR == 0) { print "none"; exit }
        printf "p50 %.2f p90 %.2f p99 %.2f max %.2f (%d)\n", v[int(NR * .5) + 1], v[int(NR * .9) + 1], v[int(NR * .99) + 1], v[NR], NR }'
}

# Where the time went, from acceld's log: time from request to answer inside acceld (access
# log lines), and the task database's commits (debug lines: tasks per commit, duration).
server_side() {
    echo "acceld answer ms: $(grep 'POST /api/v1/conversions 200' "$work/acceld.log" | awk '{
        for (i = 1; i <= NF; i++) if ($i == "200") { d = $(i + 1); break }
        if (d ~ /µs$/) { sub(/µs$/, "", d); d /= 1000 } else if (d ~ /ns$/) { sub(/ns$/, "", d); d /= 1e6 }
        else if (d ~ /ms$/) { sub(/ms$/, "", d) } else { sub(/s$/, "", d); d *= 1000 }
        print d }' | percentiles)"
    if grep -q 'task database commit' "$work/acceld.log"; then
        echo "tasks per commit: $(grep 'task database commit' "$work/acceld.log" | sed 's/.*ops=\([0-9]*\).*/\1/' | percentiles)"
        echo "commit ms: $(grep 'task database commit' "$work/acceld.log" | sed 's/.*took_us=\([0-9]*\).*/\1/' | awk '{print $1 / 1000}' | percentiles)"
    fi
}

client() {
    "$bin/examples/acceld_load" --addr "127.0.0.1:$PORT" --auth "$AUTH" --registry "$REGISTRY" "$@"
}

echo "task database: $work/tasks.redb ($(df -T "$work" | awk 'NR==2 {print $2}'))"
start
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
cpu0=$(cpu) wcpu0=$(writer_cpu)
client --events "$EVENTS" --clients "$CLIENTS" --rate "$RATE" --save-ids "$work/ids" --no-check
cpu1=$(cpu) wcpu1=$(writer_cpu)
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
per_event() {
    echo "$1 $2 $EVENTS" | awk '{printf "%.2f s, %.0f us per event", $2 - $1, ($2 - $1) * 1e6 / $3}'
}
echo "acceld CPU: $(per_event "$cpu0" "$cpu1"); of which the task database writer: $(per_event "$wcpu0" "$wcpu1")"
server_side
client --fsync-probe "$work" --events 500

client --check-ids "$work/ids"

# Acknowledged means on disk: kill without warning, start again, and every task is listed.
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
start
client --check-ids "$work/ids"
kill -TERM "$pid"
wait "$pid" 2>/dev/null || true
pid=
