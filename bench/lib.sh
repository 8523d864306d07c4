# Shared parts of bench/zstdchunked.sh and bench/multi.sh: packages, fixture, release build,
# a private registry and containerd on loopback, the Debian source image, and timing helpers.
# Sourced, not run. The caller sets `packages` (extra Debian packages) before `bench_setup`.
# shellcheck shell=bash disable=SC2034,SC2154 # variables are set for, and by, the sourcing script

PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${ACCEL_FIXTURE_CACHE:-/var/cache/accel-test}
fixture=$cache/rootfs-bookworm-minbase-amd64.v1.tar
keep=
work=
registry_pid=
containerd_pid=
throttled=

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

base_packages=(
	docker-registry # local registry the tools pull from and push to
	skopeo          # pushes the source image, reads manifests
	time            # /usr/bin/time -v for peak RSS
	jq
	curl
)

install_packages() {
	local missing=() p
	for p in "${base_packages[@]}" "${packages[@]}"; do
		if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
			missing+=("$p")
		fi
	done
	[ ${#missing[@]} -eq 0 ] && return
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get -o DPkg::Lock::Timeout=600 update -qq
	apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_fixture() {
	[ -s "$fixture" ] && return
	log "fixture $fixture missing; preparing it with scripts/test"
	ACCEL_TEST_SETUP_ONLY=1 ACCEL_FIXTURE_CACHE=$cache "$repo/scripts/test"
	[ -s "$fixture" ] || die "scripts/test did not produce $fixture"
}

build_accelctl() {
	if [ -n "${ACCELCTL:-}" ]; then
		accelctl=$ACCELCTL
		[ -x "$accelctl" ] || die "ACCELCTL=$accelctl is not an executable"
		return
	fi
	if ! command -v cargo >/dev/null 2>&1 && [ -x "${HOME:-/root}/.cargo/bin/cargo" ]; then
		PATH=${HOME:-/root}/.cargo/bin:$PATH
	fi
	command -v cargo >/dev/null 2>&1 || die "cargo not found"
	log "building accelctl (release)"
	(cd "$repo" && cargo build --release --quiet --bin accelctl) || die "cargo build failed"
	local target_dir
	target_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
	accelctl=$target_dir/release/accelctl
	[ -x "$accelctl" ] || die "$accelctl not found after the build"
}

cleanup() {
	local rc=$?
	set +e
	[ -n "$containerd_pid" ] && kill "$containerd_pid" 2>/dev/null && wait "$containerd_pid" 2>/dev/null
	[ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null && wait "$registry_pid" 2>/dev/null
	[ -n "$throttled" ] && tc qdisc del dev lo root 2>/dev/null
	if [ -n "$work" ] && grep -q " $work/" /proc/self/mounts; then
		awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/self/mounts | sort -r | xargs -r -n1 umount -l
	fi
	if [ -n "$keep" ]; then
		log "kept $work"
	elif [ -n "$work" ]; then
		rm -rf "$work"
	fi
	exit "$rc"
}

# Packages, fixture, accelctl, work directory (removed on exit unless keep is set).
bench_setup() {
	[ "$(id -u)" = 0 ] || die "run as root: it installs Debian packages and starts servers"
	install_packages
	ensure_fixture
	build_accelctl
	work=$(mktemp -d "${ACCEL_BENCH_TMP:-/var/tmp}/accel-bench.XXXXXX")
	mkdir -p "$work/runs"
	trap cleanup EXIT
	trap 'exit 130' INT TERM
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Starts docker-registry on a free loopback port; sets registry (host:port) and registry_pid.
start_registry() {
	local attempt port i
	mkdir -p "$work/registry"
	for attempt in 1 2 3 4 5; do
		port=$((20000 + RANDOM % 40000))
		port_in_use "$port" && continue
		printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:%s\n' \
			"$work/registry/data" "$port" >"$work/registry/config.yml"
		docker-registry serve "$work/registry/config.yml" >"$work/registry/log" 2>&1 &
		registry_pid=$!
		for i in $(seq 100); do
			if ! kill -0 "$registry_pid" 2>/dev/null; then
				wait "$registry_pid" || true
				registry_pid=
				break
			fi
			if curl -fs "http://127.0.0.1:$port/v2/" >/dev/null; then
				registry=127.0.0.1:$port
				log "registry on $registry (attempt $attempt)"
				return
			fi
			sleep 0.1
		done
		[ -n "$registry_pid" ] && { kill "$registry_pid"; wait "$registry_pid" 2>/dev/null || true; registry_pid=; }
	done
	tail -n 20 "$work/registry/log" >&2 || true
	die "docker-registry did not start on a loopback port"
}

# throttle_registry RATE: what the registry sends (blobs being pulled) goes through a token
# bucket of RATE (tc's units: 1gbit, 400mbit, 50mbps) on the loopback device, so pulls cost what
# they cost from a registry across a network link; pushes are not limited. Removed on exit. It
# owns lo's root qdisc, and refuses to run if something else has set one.
throttle_registry() {
	local rate=$1 port=${registry##*:}
	command -v tc >/dev/null || die "--rate needs tc (Debian package iproute2)"
	tc qdisc show dev lo | grep -q '^qdisc noqueue 0: root' ||
		die "lo already has a root qdisc ($(tc qdisc show dev lo | head -n1)); remove it or run without --rate"
	tc qdisc add dev lo root handle 1: htb || die "could not add an htb qdisc to lo"
	throttled=1
	tc class add dev lo parent 1: classid 1:20 htb rate "$rate" ceil "$rate" burst 256k cburst 256k quantum 65536 ||
		die "tc refused the rate '$rate' (examples: 1gbit, 400mbit, 50mbps)"
	tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip sport "$port" 0xffff flowid 1:20 ||
		die "could not add the tc filter for port $port"
	log "registry replies limited to $rate"
}

# Starts a private containerd (own root, state, socket); sets ctr_sock and containerd_pid.
start_containerd() {
	local d=$work/containerd i
	mkdir -p "$d"
	ctr_sock=$d/containerd.sock
	cat >"$d/config.toml" <<-EOF
		version = 2
		root = "$d/root"
		state = "$d/state"
		disabled_plugins = [
		  "io.containerd.grpc.v1.cri",
		  "io.containerd.internal.v1.opt",
		  "io.containerd.snapshotter.v1.aufs",
		  "io.containerd.snapshotter.v1.btrfs",
		  "io.containerd.snapshotter.v1.devmapper",
		  "io.containerd.snapshotter.v1.zfs",
		  "io.containerd.snapshotter.v1.overlayfs",
		  "io.containerd.tracing.processor.v1.otlp",
		  "io.containerd.internal.v1.tracing",
		]
		[grpc]
		  address = "$ctr_sock"
		[ttrpc]
		  address = "$ctr_sock.ttrpc"
		[debug]
		  address = ""
		[metrics]
		  address = ""
	EOF
	containerd --config "$d/config.toml" >"$d/log" 2>&1 &
	containerd_pid=$!
	for i in $(seq 100); do
		kill -0 "$containerd_pid" 2>/dev/null || { tail -n 20 "$d/log" >&2; die "containerd exited at start"; }
		if ctr-remote --address "$ctr_sock" version >/dev/null 2>&1; then
			log "containerd on $ctr_sock"
			return
		fi
		sleep 0.1
	done
	tail -n 20 "$d/log" >&2
	die "containerd did not answer on $ctr_sock"
}

ctr() { ctr-remote --address "$ctr_sock" --namespace bench "$@"; }

# Pushes the rootfs fixture as a one-layer OCI image (gzip -n at gzip's default level, as image
# builders do) to $1; sets src_uncompressed and src_layer_bytes.
push_debian_image() {
	local ref=$1 oci=$work/oci blobs diff digest size config cdigest manifest mdigest
	blobs=$oci/blobs/sha256
	mkdir -p "$blobs"
	diff=$(sha256sum <"$fixture" | cut -d' ' -f1)
	gzip -n -c <"$fixture" >"$blobs/.layer"
	digest=$(sha256sum <"$blobs/.layer" | cut -d' ' -f1)
	size=$(stat -c %s "$blobs/.layer")
	mv "$blobs/.layer" "$blobs/$digest"
	config="{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{\"Cmd\":[\"/bin/bash\"]},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$diff\"]}}"
	cdigest=$(printf '%s' "$config" | sha256sum | cut -d' ' -f1)
	printf '%s' "$config" >"$blobs/$cdigest"
	manifest="{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$cdigest\",\"size\":${#config}},\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$digest\",\"size\":$size}]}"
	mdigest=$(printf '%s' "$manifest" | sha256sum | cut -d' ' -f1)
	printf '%s' "$manifest" >"$blobs/$mdigest"
	printf '{"imageLayoutVersion":"1.0.0"}' >"$oci/oci-layout"
	printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"src"}}]}' \
		"$mdigest" "${#manifest}" >"$oci/index.json"
	printf '{"default":[{"type":"insecureAcceptAnything"}]}' >"$work/policy.json"
	skopeo --policy "$work/policy.json" copy --quiet --dest-tls-verify=false "oci:$oci:src" "docker://$ref" >"$work/skopeo-push.log" 2>&1 ||
		{ cat "$work/skopeo-push.log" >&2; die "skopeo could not push the source image"; }
	src_uncompressed=$(stat -L -c %s "$fixture")
	src_layer_bytes=$size
	src_layer_file=$blobs/$digest
}

# An accelctl config with an embedded store at $2, written to $1.
accel_config() { printf 'store:\n  kind: embedded\n  path: %s\n' "$2" >"$1"; }

now() { date +%s.%N; }

# CPU seconds (user + system) a process has used so far.
proc_cpu() {
	awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f\n", ($12 + $13) / hz }' "/proc/$1/stat"
}

tv_field() { awk -F': ' -v k="$2" 'index($1, k) { print $2 }' "$1"; }

# timed SERVER_PID NAME CMD...: runs CMD under /usr/bin/time -v; sets run_secs, run_rss_kib,
# run_cpu, run_server_cpu (CPU the server process used meanwhile) and out (its stdout file).
timed() {
	local server=$1 name=$2
	shift 2
	local tv=$work/runs/$name.time before after start end
	before=$(proc_cpu "$server")
	start=$(now)
	if ! /usr/bin/time -v -o "$tv" "$@" >"$work/runs/$name.out" 2>"$work/runs/$name.err"; then
		tail -n 30 "$work/runs/$name.err" >&2
		die "$name failed: $*"
	fi
	end=$(now)
	after=$(proc_cpu "$server")
	run_secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
	run_rss_kib=$(tv_field "$tv" "Maximum resident set size")
	run_cpu=$(awk -v u="$(tv_field "$tv" "User time")" -v s="$(tv_field "$tv" "System time")" 'BEGIN { printf "%.2f", u + s }')
	run_server_cpu=$(awk -v a="$before" -v b="$after" 'BEGIN { printf "%.2f", b - a }')
	out=$work/runs/$name.out
}

layer_bytes() { jq '[.layers[].size] | add'; }
best() { printf '%s\n' "$@" | sort -g | awk 'NR == 1'; }
median() {
	printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
maximum() { printf '%s\n' "$@" | sort -g | awk 'END { print }'; }
sum() { printf '%s\n' "$@" | awk '{ s += $1 } END { printf "%.2f\n", s }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
verdict() {
	if awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN { exit !(op == "ge" ? v >= t : op == "le" ? v <= t : v < t) }'; then
		echo PASS
	else
		echo MISS
	fi
}

# A note when the load average went above the core count during the runs ($@: samples).
load_note() {
	local l
	l=$(maximum "$@" "$(cut -d' ' -f1 /proc/loadavg)")
	if awk -v l="$l" -v n="$(nproc)" 'BEGIN { exit !(l > n) }'; then
		echo
		echo "note: load average reached $l on $(nproc) core(s); wall-time ratios then depend on the other"
		echo "      load on the machine, CPU-time ratios much less. Rerun when the machine is quieter."
	fi
}
