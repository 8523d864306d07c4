#!/bin/sh
# Throughput of acceld's Kafka path: events published into a Kafka topic (the tansu broker),
# read by acceld's Kafka source through a consumer group, stored as tasks, run by the workers
# and published by the Kafka sink to another topic, timed until every result is back. The conversion itself is left out: every event names an image
# that is already a conversion output, so each task resolves it and finishes with nothing to
# convert. See bench/README.md.
#
#   bench/kafka.sh                          # 20000 events, ack: finished
#   ACK=stored EVENTS=50000 bench/kafka.sh
#   PROFILE=dev bench/kafka.sh              # debug build of accel (dependencies are optimised)
#   ACCEL_TANSU=/path/to/tansu bench/kafka.sh
set -eu

EVENTS=${EVENTS:-20000}
ACK=${ACK:-finished}
IN_FLIGHT=${IN_FLIGHT:-256}
PARTITIONS=${PARTITIONS:-4}
TANSU=${ACCEL_TANSU:-/usr/local/lib/accel-test/tansu/bin/tansu}
CONCURRENCY=${CONCURRENCY:-16}
PROFILE=${PROFILE:-release}
# The task database must be on local disk, where commits really wait for fsync.
WORKDIR=${WORKDIR:-/var/tmp}

for tool in docker-registry curl; do
    command -v "$tool" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin
    command -v "$tool" >/dev/null 2>&1 || { echo "bench/kafka.sh: $tool is missing; run scripts/test (or apt-get install docker-registry curl)" >&2; exit 1; }
done
[ -x "$TANSU" ] || { echo "bench/kafka.sh: the tansu broker is missing at $TANSU; run scripts/test (it installs it) or set ACCEL_TANSU" >&2; exit 1; }

cd "$(dirname "$0")/.."
if [ "$PROFILE" = release ]; then
    cargo build --release --quiet --bin acceld --example bus_load
    bin=${CARGO_TARGET_DIR:-target}/release
else
    cargo build --quiet --bin acceld --example bus_load
    bin=${CARGO_TARGET_DIR:-target}/debug
fi
work=$(mktemp -d "$WORKDIR/kafka-bench.XXXXXX")
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

kafka_port=$(free_port)
"$TANSU" broker --storage-engine memory://tansu/ --listener-url "tcp://127.0.0.1:$kafka_port" \
    --advertised-listener-url "tcp://127.0.0.1:$kafka_port" >"$work/tansu.log" 2>&1 &
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
until python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$kafka_port" 2>/dev/null; do
    i=$((i + 1)); [ $i -gt 200 ] && { cat "$work/tansu.log" >&2; exit 1; }; sleep 0.05
done
registry=127.0.0.1:$reg_port
kafka=127.0.0.1:$kafka_port
"$TANSU" topic create bench.images --broker "tcp://$kafka" --partitions "$PARTITIONS" >>"$work/tansu.log" 2>&1
"$TANSU" topic create bench.results --broker "tcp://$kafka" --partitions 1 >>"$work/tansu.log" 2>&1

api_port=$(free_port)
cat > "$work/pipelines.yaml" <<YAML
server: { listen: "127.0.0.1:$api_port", shutdown_grace_secs: 0 }
store: { kind: embedded, path: "$work/store" }
registries: { "$registry": {} }
tasks: { path: "$work/tasks.redb", queue_size: 100000 }
sources:
  bus: { kind: kafka, brokers: "$kafka", topic: bench.images, group: acceld, ack: $ACK, max_in_flight: $IN_FLIGHT }
sinks:
  results: { kind: kafka, brokers: "$kafka", topic: bench.results }
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

echo "acceld $PROFILE build, Kafka (tansu, $PARTITIONS partitions), ack: $ACK, max_in_flight $IN_FLIGHT, pipeline concurrency $CONCURRENCY, task database on $(df -T "$work" | awk 'NR==2 {print $2}')"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
cpu() {
    awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"
}
cpu0=$(cpu "$acceld")
"$bin/examples/bus_load" --kafka "$kafka" --registry "$registry" --events "$EVENTS" --subject bench.images --results bench.results
cpu1=$(cpu "$acceld")
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$cpu0 $cpu1 $EVENTS" | awk '{printf "acceld CPU: %.2f s, %.0f us per event\n", $2 - $1, ($2 - $1) * 1e6 / $3}'
echo "undelivered results left: $(curl -s "http://127.0.0.1:$api_port/metrics" | awk '/^accel_sink_undelivered/ {print $2}')"
