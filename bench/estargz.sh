#!/usr/bin/env bash
# Side-by-side eStargz benchmark: converts the same real Debian image with accelctl and with
# the reference tool (stargz-snapshotter's `ctr-remote image convert`) in one run on this
# machine, then prints times, output sizes, peak memory and the ratios the README targets.
#
#   bench/estargz.sh [--runs N] [--layers 1|3] [--level L] [--perf] [--keep]
#
#   --runs N     runs of each side (default 2); best and median are reported, every run printed
#   --layers 3   split the rootfs into three layers (base, usr, var) instead of one
#   --level L    gzip level of both tools (default 9)
#   --perf       after the timed runs, profile one more conversion of each side with perf
#                and print where CPU time goes (needs linux-perf)
#   --keep       keep the work directory (logs, stores, registry data) and print its path
#
# Environment:
#   ACCEL_FIXTURE_CACHE   where scripts/test keeps the rootfs fixture (default /var/cache/accel-test)
#   ACCEL_BENCH_TMP       parent of the work directory (default /var/tmp)
#   CARGO_TARGET_DIR      honoured by the release build of accelctl
#
# Needs root (Debian packages, containerd). Talks to nothing but loopback once the packages
# and the fixture are present. Exits 0 whether or not the targets are met; non-zero only when
# something failed to run.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=2
layers=1
level=9
profile=

# Targets stated in README.md.
target_speedup=5
target_size_pct=2
target_rss_mib=256

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
	case $1 in
		--runs) runs=${2:?}; shift 2 ;;
		--layers) layers=${2:?}; shift 2 ;;
		--level) level=${2:?}; shift 2 ;;
		--keep) keep=1; shift ;;
		--perf) profile=1; shift ;;
		-h | --help) usage 0 ;;
		*) log "unknown argument $1"; usage 2 >&2 ;;
	esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "--runs wants a positive number, got $runs"
[[ $layers == 1 || $layers == 3 ]] || die "--layers is 1 or 3, got $layers"
[[ $level =~ ^[0-9]$ ]] || die "--level is 0 to 9, got $level"

packages=(
	containerd         # the reference tool's content store
	stargz-snapshotter # ctr-remote, the reference eStargz converter
)
[ -n "$profile" ] && packages+=(linux-perf)
bench_setup

# --- source image -------------------------------------------------------------

# Layer tars of the source image: the whole rootfs, or base / usr / var.
split_layers() {
	local dir=$work/layers
	mkdir -p "$dir"
	if [ "$layers" = 1 ]; then
		ln -s "$fixture" "$dir/1.tar"
		return
	fi
	local top others
	top=$(tar -tf "$fixture" | awk -F/ '{ print $1 }' | sort -u)
	others=$(grep -vx -e usr -e var <<<"$top")
	# Deleting members keeps the raw headers of the rest as they are.
	cp "$fixture" "$dir/1.tar" && tar --delete -f "$dir/1.tar" usr var
	# shellcheck disable=SC2086 # $others is a list of names
	cp "$fixture" "$dir/2.tar" && tar --delete -f "$dir/2.tar" $others var
	# shellcheck disable=SC2086
	cp "$fixture" "$dir/3.tar" && tar --delete -f "$dir/3.tar" $others usr
}

# An OCI layout with one gzip layer per tar (gzip -n, default level, as image builders do).
build_source_layout() {
	local oci=$work/oci blobs diff_ids="" layer_descs="" t diff digest size
	blobs=$oci/blobs/sha256
	mkdir -p "$blobs"
	for t in "$work"/layers/*.tar; do
		diff=$(sha256sum <"$t" | cut -d' ' -f1)
		gzip -n -c <"$t" >"$blobs/.layer"
		digest=$(sha256sum <"$blobs/.layer" | cut -d' ' -f1)
		size=$(stat -c %s "$blobs/.layer")
		mv "$blobs/.layer" "$blobs/$digest"
		diff_ids+="${diff_ids:+,}\"sha256:$diff\""
		layer_descs+="${layer_descs:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$digest\",\"size\":$size}"
	done
	local config manifest cdigest mdigest
	config="{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{\"Cmd\":[\"/bin/bash\"]},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[$diff_ids]}}"
	cdigest=$(printf '%s' "$config" | sha256sum | cut -d' ' -f1)
	printf '%s' "$config" >"$blobs/$cdigest"
	manifest="{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$cdigest\",\"size\":${#config}},\"layers\":[$layer_descs]}"
	mdigest=$(printf '%s' "$manifest" | sha256sum | cut -d' ' -f1)
	printf '%s' "$manifest" >"$blobs/$mdigest"
	printf '{"imageLayoutVersion":"1.0.0"}' >"$oci/oci-layout"
	printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"src"}}]}' \
		"$mdigest" "${#manifest}" >"$oci/index.json"
}

push_source() {
	printf '{"default":[{"type":"insecureAcceptAnything"}]}' >"$work/policy.json"
	skopeo --policy "$work/policy.json" copy --quiet --dest-tls-verify=false \
		"oci:$work/oci:src" "docker://$src_ref" >"$work/skopeo.log" 2>&1 ||
		{ cat "$work/skopeo.log" >&2; die "skopeo could not push the source image"; }
}

# Seconds between accelctl's stage log lines, e.g. "pull 1.20 convert 9.80 push 0.40".
accel_phases() {
	sed 's/\x1b\[[0-9;]*m//g' "$1" | awk '
		function t(s,   d, h, m, sec) {
			split(substr(s, 12, 15), d, ":"); h = d[1]; m = d[2]; sec = d[3]; sub(/Z$/, "", sec)
			return h * 3600 + m * 60 + sec
		}
		/ pulling image / { a = t($1) } / pulled image / { b = t($1) }
		/ converting image / { c = t($1) } / converted image / { d = t($1) }
		/ pushing image / { e = t($1) } / pushed image / { f = t($1) }
		END { printf "pull %.2fs, convert %.2fs, push %.2fs", b - a, d - c, f - e }
	'
}

# --- the benchmark ------------------------------------------------------------

start_registry
start_containerd
src_ref=$registry/bench/debian:src

log "building the source image ($layers layer(s)) from $fixture"
split_layers
build_source_layout
push_source
src_layer_bytes=$(skopeo inspect --raw --tls-verify=false "docker://$src_ref" | layer_bytes)
src_uncompressed=$(stat -L -c %s "$work"/layers/*.tar | awk '{ s += $1 } END { print s }')
log "source: $src_ref, $layers layer(s), $src_uncompressed bytes of tar, $src_layer_bytes bytes gzip"

log "ctr-remote: pulling the source into containerd (not timed)"
ctr images pull --plain-http --snapshotter native "$src_ref" >"$work/ctr-pull.log" 2>&1 ||
	{ tail -n 20 "$work/ctr-pull.log" >&2; die "ctr-remote images pull failed"; }

cat >"$work/accel.yaml" <<EOF
store:
  kind: embedded
  path: $work/accel-store-1
EOF

ctr_target=$registry/bench/debian:ctr-esgz
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
declare -a loads=()
declare -a ctr_secs=() ctr_rss=() ctr_cpu=() cold_secs=() cold_rss=() cold_cpu=() warm_secs=() warm_rss=() warm_cpu=()
ctr_bytes="" accel_bytes="" ctr_uncompressed="" accel_uncompressed=""
printf '\n%-10s %-4s %9s %9s %9s %11s %6s  %s\n' side run seconds cpu_s server_s "out_bytes" rss_MiB "notes"

for i in $(seq "$runs"); do
	load=$(cut -d' ' -f1 /proc/loadavg)
	loads+=("$load")

	# Reference: converts from containerd's content store, nothing pulled or pushed.
	ctr images rm "$ctr_target" >/dev/null 2>&1 || true
	timed "$containerd_pid" "ctr-$i" ctr-remote --address "$ctr_sock" --namespace bench \
		image convert --estargz --oci --estargz-compression-level "$level" "$src_ref" "$ctr_target"
	ctr_secs+=("$run_secs"); ctr_rss+=("$run_rss_kib")
	# The client compresses; containerd serves the blobs and stores the result.
	ctr_cpu+=("$(awk -v a="$run_cpu" -v b="$run_server_cpu" 'BEGIN { printf "%.2f", a + b }')")
	mdigest=$(ctr images ls | awk -v r="$ctr_target" '$1 == r { print $3 }')
	[ -n "$mdigest" ] || die "ctr-remote made no image $ctr_target"
	ctr content get "$mdigest" >"$work/runs/ctr-$i.manifest.json"
	bytes=$(layer_bytes <"$work/runs/ctr-$i.manifest.json")
	[ -n "$ctr_bytes" ] && [ "$bytes" != "$ctr_bytes" ] && log "note: ctr-remote output size changed between runs ($ctr_bytes, $bytes)"
	ctr_bytes=$bytes
	ctr_uncompressed=$(jq '[.layers[].annotations["io.containers.estargz.uncompressed-size"] // "0" | tonumber] | add' "$work/runs/ctr-$i.manifest.json")
	printf '%-10s %-4s %9s %9s %9s %11s %6s  %s\n' ctr-remote "$i" "$run_secs" "$run_cpu" "$run_server_cpu" "$bytes" "$(mib "$run_rss_kib")" "load $load; containerd CPU in server_s"

	# Ours, cold: empty store, so pull + convert + push. Run 1 targets the usual name; later
	# runs push to their own repository so that they upload as much as run 1 did.
	store=$work/accel-store-cold-$i
	sed "s|path: .*|path: $store|" "$work/accel.yaml" >"$work/accel-cold-$i.yaml"
	if [ "$i" = 1 ]; then
		target_args=()
		cold1_config=$work/accel-cold-$i.yaml
	else
		target_args=(--target "$registry/bench/debian-cold$i:src-esgz")
	fi
	timed "$registry_pid" "accel-cold-$i" env NO_COLOR=1 "$accelctl" convert --config "$work/accel-cold-$i.yaml" \
		--option "compression_level=$level" --output json "${target_args[@]}" "$src_ref"
	cold_secs+=("$run_secs"); cold_rss+=("$run_rss_kib"); cold_cpu+=("$run_cpu")
	target=$(jq -r '.targets[0].reference' "$out")
	skopeo inspect --raw --tls-verify=false "docker://$target" >"$work/runs/accel-cold-$i.manifest.json"
	bytes=$(layer_bytes <"$work/runs/accel-cold-$i.manifest.json")
	[ -n "$accel_bytes" ] && [ "$bytes" != "$accel_bytes" ] && log "note: accelctl output size changed between runs ($accel_bytes, $bytes)"
	accel_bytes=$bytes
	accel_uncompressed=$(jq '[.layers[].annotations["io.containers.estargz.uncompressed-size"] // "0" | tonumber] | add' "$work/runs/accel-cold-$i.manifest.json")
	printf '%-10s %-4s %9s %9s %9s %11s %6s  %s\n' accel-cold "$i" "$run_secs" "$run_cpu" "$run_server_cpu" "$bytes" "$(mib "$run_rss_kib")" \
		"$(accel_phases "$work/runs/accel-cold-$i.err"); registry CPU in server_s"

	# Ours, warm: the source is in the store of cold run 1 and the converted blobs are in the
	# registry already, so this is conversion plus existence checks and a manifest push.
	timed "$registry_pid" "accel-warm-$i" env NO_COLOR=1 "$accelctl" convert --config "$cold1_config" \
		--option "compression_level=$level" --output json --tag-suffix "-esgz$((i + 1))" "$src_ref"
	warm_secs+=("$run_secs"); warm_rss+=("$run_rss_kib"); warm_cpu+=("$run_cpu")
	target=$(jq -r '.targets[0].reference' "$out")
	bytes=$(skopeo inspect --raw --tls-verify=false "docker://$target" | layer_bytes)
	[ "$bytes" != "$accel_bytes" ] && log "note: accelctl output size changed between runs ($accel_bytes, $bytes)"
	printf '%-10s %-4s %9s %9s %9s %11s %6s  %s\n' accel-warm "$i" "$run_secs" "$run_cpu" "$run_server_cpu" "$bytes" "$(mib "$run_rss_kib")" \
		"$(accel_phases "$work/runs/accel-warm-$i.err")"
done

# Both tools must have described the same uncompressed content.
if [ "$ctr_uncompressed" != "$accel_uncompressed" ]; then
	log "note: uncompressed sizes differ: ctr-remote $ctr_uncompressed, accelctl $accel_uncompressed"
fi

# --- report -------------------------------------------------------------------

ctr_best=$(best "${ctr_secs[@]}"); ctr_med=$(median "${ctr_secs[@]}")
cold_best=$(best "${cold_secs[@]}"); cold_med=$(median "${cold_secs[@]}")
warm_best=$(best "${warm_secs[@]}"); warm_med=$(median "${warm_secs[@]}")
ctr_rss_max=$(maximum "${ctr_rss[@]}")
cold_rss_max=$(maximum "${cold_rss[@]}")
warm_rss_max=$(maximum "${warm_rss[@]}")
accel_rss_max=$(maximum "$cold_rss_max" "$warm_rss_max")
ctr_cpu_med=$(median "${ctr_cpu[@]}"); cold_cpu_med=$(median "${cold_cpu[@]}"); warm_cpu_med=$(median "${warm_cpu[@]}")


speed_warm_med=$(ratio "$ctr_med" "$warm_med"); speed_warm_best=$(ratio "$ctr_best" "$warm_best")
speed_cold_med=$(ratio "$ctr_med" "$cold_med"); speed_cold_best=$(ratio "$ctr_best" "$cold_best")
size_ratio=$(awk -v a="$accel_bytes" -v b="$ctr_bytes" 'BEGIN { printf "%.4f", a / b }')
size_pct=$(awk -v r="$size_ratio" 'BEGIN { printf "%+.2f", (r - 1) * 100 }')
rss_mib=$(mib "$accel_rss_max")
cpu_ratio=$(ratio "$ctr_cpu_med" "$warm_cpu_med")

cat <<EOF

eStargz conversion, gzip level $level, $runs run(s) per side, $(nproc) core(s)
source: $layers layer(s), $src_uncompressed bytes of tar, $src_layer_bytes bytes gzip (Debian bookworm minbase)

tool                        best_s  median_s  median_cpu_s   out_bytes   peak_RSS_MiB
ctr-remote image convert  $(printf '%8s  %8s  %12s  %10s  %13s' "$ctr_best" "$ctr_med" "$ctr_cpu_med" "$ctr_bytes" "$(mib "$ctr_rss_max")")
accelctl convert (warm)   $(printf '%8s  %8s  %12s  %10s  %13s' "$warm_best" "$warm_med" "$warm_cpu_med" "$accel_bytes" "$(mib "$warm_rss_max")")
accelctl convert (cold)   $(printf '%8s  %8s  %12s  %10s  %13s' "$cold_best" "$cold_med" "$cold_cpu_med" "$accel_bytes" "$(mib "$cold_rss_max")")

warm = source already in accel's store: convert + push of blobs the registry has (comparable to
       ctr-remote, which converts from containerd's store and pushes nothing)
cold = empty store: pull + convert + push
cpu  = user + system seconds; for ctr-remote the client plus containerd's share
load average before / after: $load_start / $(cut -d' ' -f1-3 /proc/loadavg)

EOF

line() { printf '%-40s %s\n' "$1" "$2"; }
line "speedup (ctr-remote s / accel s)" "warm: median ${speed_warm_med}x, best ${speed_warm_best}x; cold: median ${speed_cold_med}x, best ${speed_cold_best}x"
line "CPU-time ratio (ctr-remote / warm)" "${cpu_ratio}x (less sensitive to other load on the machine)"
line "size ratio (accel / ctr-remote)" "$size_ratio ($size_pct%)"
line "accel peak RSS" "$rss_mib MiB (ctr-remote client: $(mib "$ctr_rss_max") MiB)"
load_note "${loads[@]}"
echo
line "target: speedup >= ${target_speedup}x (warm, median)" "$(verdict "$speed_warm_med" ge "$target_speedup")"
line "target: output <= ${target_size_pct}% larger" "$(verdict "$size_pct" le "$target_size_pct")"
line "target: peak RSS < ${target_rss_mib} MiB" "$(verdict "$rss_mib" lt "$target_rss_mib")"

# Not timed: where CPU time goes, per thread and function.
profile_side() {
	local name=$1
	shift
	perf record -q -F 999 -g -o "$work/perf-$name.data" -- "$@" >"$work/perf-$name.log" 2>&1 ||
		{ tail -n 20 "$work/perf-$name.log" >&2; die "perf record of $name failed"; }
	printf '\nwhere %s spends CPU (%% of its samples, by thread and function; top 15):\n' "$name"
	perf report -i "$work/perf-$name.data" --no-children -g none --sort comm,dso,sym --stdio 2>/dev/null |
		awk '/^ +[0-9.]+%/ && n++ < 15'
}
if [ -n "$profile" ]; then
	log "profiling one more conversion of each side (not timed)"
	ctr images rm "$ctr_target" >/dev/null 2>&1 || true
	profile_side ctr-remote ctr-remote --address "$ctr_sock" --namespace bench \
		image convert --estargz --oci --estargz-compression-level "$level" "$src_ref" "$ctr_target"
	profile_side accelctl env NO_COLOR=1 "$accelctl" convert --config "$cold1_config" \
		--option "compression_level=$level" --tag-suffix -esgz-perf "$src_ref"
fi
