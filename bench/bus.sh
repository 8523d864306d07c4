#!/bin/sh
# Throughput of acceld's bus path: events published into JetStream, read by acceld's
# JetStream source, stored as tasks, run by the workers and published by the NATS sink, timed
# until every result is back. The conversion itself is left out: every event names an image
# that is already a conversion output, so each task resolves it and finishes with nothing to
# convert. See bench/README.md.
#
#   bench/bus.sh                          # 20000 events, ack: finished
#   ACK=stored EVENTS=50000 bench/bus.sh
#   PROFILE=dev bench/bus.sh              # debug build of accel (dependencies are optimised)
set -eu

EVENTS=${EVENTS:-20000}
ACK=${ACK:-finished}
BATCH=${BATCH:-256}
CONCURRENCY=${CONCURRENCY:-16}
PROFILE=${PROFILE:-release}
# The task database must be on local disk, where commits really wait for fsync.
WORKDIR=${WORKDIR:-/var/tmp}

for tool in nats-server docker-registry curl; do
    command -v "$tool" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin
    command -v "$tool" >/dev/null 2>&1 || { echo "bench/bus.sh: $tool is missing; run scripts/test (or apt-get install nats-server docker-registry curl)" >&2; exit 1; }
done

cd "$(dirname "$0")/.."
if [ "$PROFILE" = release ]; then
    cargo build --release --quiet --bin acceld --example bus_load
    bin=${CARGO_TARGET_DIR:-target}/release
else
    cargo build --quiet --bin acceld --example bus_load
    bin=${CARGO_TARGET_DIR:-target}/debug
fi
work=$(mktemp -d "$WORKDIR/bus-bench.XXXXXX")
pids=
cleanup() {
    for p in $pids; do kill -9 "$p" 2>/dev/null || true; done
    if [ -n "${KEEP:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_port() {
    i=0
    until curl -s -o /dev/null "http://127.0.0.1:$1/"; do
        i=$((i + 1))
        if [ $i -gt 200 ]; then echo "nothing listens on port $1 ($2):" >&2; cat "$work/$2.log" >&2; exit 1; fi
        sleep 0.05
    done
}

nats_port=$(free_port)
nats-server -a 127.0.0.1 -p "$nats_port" -js -sd "$work/nats" >"$work/nats.log" 2>&1 &
pids="$pids $!"
reg_port=$(free_port)
cat > "$work/registry.yml" <<YAML
version: 0.1
log: { level: warn }
storage: { filesystem: { rootdirectory: $work/registry } }
http: { addr: 127.0.0.1:$reg_port }
YAML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids="$pids $!"
wait_port "$reg_port" registry
i=0
until grep -q "Server is ready" "$work/nats.log"; do
    i=$((i + 1)); [ $i -gt 200 ] && { cat "$work/nats.log" >&2; exit 1; }; sleep 0.05
done
registry=127.0.0.1:$reg_port
nats=nats://127.0.0.1:$nats_port

api_port=$(free_port)
cat > "$work/pipelines.yaml" <<YAML
server: { listen: "127.0.0.1:$api_port", shutdown_grace_secs: 0 }
store: { kind: embedded, path: "$work/store" }
registries: { "$registry": {} }
tasks: { path: "$work/tasks.redb", queue_size: 100000 }
sources:
  bus: { kind: jetstream, url: "$nats", stream: BENCH, subjects: ["bench.images"], consumer: acceld, create: true, ack: $ACK, batch: $BATCH }
sinks:
  results: { kind: nats, url: "$nats", subject: bench.results }
pipelines:
  - name: bench
    sources: [bus]
    concurrency: $CONCURRENCY
    convert: [{ driver: estargz }]
    sinks: [results]
YAML

"$bin/examples/bus_load" --registry "$registry" --setup-only >/dev/null
"$bin/acceld" --config "$work/pipelines.yaml" 2>>"$work/acceld.log" >/dev/null &
acceld=$!
pids="$pids $acceld"
wait_port "$api_port" acceld

echo "acceld $PROFILE build, ack: $ACK, batch $BATCH, pipeline concurrency $CONCURRENCY, task database on $(df -T "$work" | awk 'NR==2 {print $2}')"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
cpu() {
    awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"
}
cpu0=$(cpu "$acceld")
"$bin/examples/bus_load" --nats "$nats" --registry "$registry" --events "$EVENTS" --subject bench.images --results bench.results
cpu1=$(cpu "$acceld")
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$cpu0 $cpu1 $EVENTS" | awk '{printf "acceld CPU: %.2f s, %.0f us per event\n", $2 - $1, ($2 - $1) * 1e6 / $3}'
echo "undelivered results left: $(curl -s "http://127.0.0.1:$api_port/metrics" | awk '/^accel_sink_undelivered/ {print $2}')"
