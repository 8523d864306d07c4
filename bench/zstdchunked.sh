#!/usr/bin/env bash
# Side-by-side zstd:chunked benchmark: converts the same real Debian image with accelctl, with
# `ctr-remote image convert --zstdchunked --oci` (stargz-snapshotter) and, when Debian's skopeo
# can write zstd:chunked, with `skopeo copy --dest-compress-format zstd:chunked`, in one run on
# this machine; prints times, output sizes, peak memory and the ratios bench/README.md targets.
#
#   bench/zstdchunked.sh [--runs N] [--level L] [--keep]
#
#   --runs N     runs of each side (default 2); best and median are reported, every run printed
#   --level L    zstd level of accelctl (default 3, zstd's default, as ctr-remote has no level
#                flag and compresses at its library's default); accelctl's own default is 10
#   --keep       keep the work directory (logs, stores, registry data) and print its path
#
# Environment: ACCEL_FIXTURE_CACHE, ACCEL_BENCH_TMP, CARGO_TARGET_DIR as for bench/estargz.sh;
# ACCELCTL=PATH uses that accelctl build instead of building one.
# Needs root. Exits 0 whether or not the targets are met; non-zero only when something failed.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=2
level=3
target_speedup=5
target_rss_mib=256

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
	case $1 in
		--runs) runs=${2:?}; shift 2 ;;
		--level) level=${2:?}; shift 2 ;;
		--keep) keep=1; shift ;;
		-h | --help) usage 0 ;;
		*) log "unknown argument $1"; usage 2 >&2 ;;
	esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "--runs wants a positive number, got $runs"
if ! [[ $level =~ ^[0-9]+$ ]] || [ "$level" -lt 1 ] || [ "$level" -gt 19 ]; then
	die "--level is 1 to 19, got $level"
fi

packages=(containerd stargz-snapshotter)
bench_setup
start_registry
start_containerd

src_ref=$registry/bench/debian:src
log "pushing the source image built from $fixture"
push_debian_image "$src_ref"
log "source: $src_ref, $src_uncompressed bytes of tar, $src_layer_bytes bytes gzip"
log "ctr-remote: pulling the source into containerd (not timed)"
ctr images pull --plain-http --snapshotter native "$src_ref" >"$work/ctr-pull.log" 2>&1 ||
	{ tail -n 20 "$work/ctr-pull.log" >&2; die "ctr-remote images pull failed"; }

# Does this skopeo write zstd:chunked? Older containers/image versions do not know the format.
skopeo_copy=(skopeo --policy "$work/policy.json" copy --quiet --src-tls-verify=false --dest-tls-verify=false
	--dest-compress-format zstd:chunked "docker://$src_ref")
skopeo_ok=
if "${skopeo_copy[@]}" "docker://$registry/bench/debian:skopeo-probe" >"$work/skopeo-probe.log" 2>&1; then
	if skopeo inspect --raw --tls-verify=false "docker://$registry/bench/debian:skopeo-probe" |
		jq -e '.layers[0].annotations["io.github.containers.zstd-chunked.manifest-checksum"]' >/dev/null; then
		skopeo_ok=1
	else
		skopeo_why="it wrote layers without zstd:chunked annotations"
	fi
else
	skopeo_why=$(tail -n 1 "$work/skopeo-probe.log")
fi
skopeo_version=$(skopeo --version)
[ -z "$skopeo_ok" ] && log "$skopeo_version cannot write zstd:chunked: $skopeo_why"

warm_config=$work/accel-warm.yaml
accel_config "$warm_config" "$work/accel-store-warm"
log "accelctl: filling the warm store and the registry (not timed)"
timed "$registry_pid" accel-prime env NO_COLOR=1 "$accelctl" convert --config "$warm_config" --driver zstdchunked \
	--option "compression_level=$level" --output json "$src_ref"

declare -a loads=() ctr_secs=() ctr_rss=() ctr_cpu=() warm_secs=() warm_rss=() warm_cpu=() cold_secs=() cold_rss=() sk_secs=() sk_rss=()
ctr_bytes='' accel_bytes='' sk_bytes=''
printf '\n%-11s %-4s %9s %9s %9s %11s %8s\n' side run seconds cpu_s server_s out_bytes rss_MiB
row() { printf '%-11s %-4s %9s %9s %9s %11s %8s\n' "$1" "$2" "$run_secs" "$run_cpu" "$run_server_cpu" "$3" "$(mib "$run_rss_kib")"; }

for i in $(seq "$runs"); do
	loads+=("$(cut -d' ' -f1 /proc/loadavg)")

	ctr_target=$registry/bench/debian:ctr-zstdchunked
	ctr images rm "$ctr_target" >/dev/null 2>&1 || true
	timed "$containerd_pid" "ctr-$i" ctr-remote --address "$ctr_sock" --namespace bench \
		image convert --zstdchunked --oci "$src_ref" "$ctr_target"
	ctr_secs+=("$run_secs"); ctr_rss+=("$run_rss_kib")
	ctr_cpu+=("$(awk -v a="$run_cpu" -v b="$run_server_cpu" 'BEGIN { printf "%.2f", a + b }')")
	mdigest=$(ctr images ls | awk -v r="$ctr_target" '$1 == r { print $3 }')
	[ -n "$mdigest" ] || die "ctr-remote made no image $ctr_target"
	ctr_bytes=$(ctr content get "$mdigest" | layer_bytes)
	row ctr-remote "$i" "$ctr_bytes"

	# Warm: the source is in accel's store and the registry has the converted blobs, like
	# ctr-remote converting from containerd's store and pushing nothing.
	timed "$registry_pid" "accel-warm-$i" env NO_COLOR=1 "$accelctl" convert --config "$warm_config" --driver zstdchunked \
		--option "compression_level=$level" --output json --tag-suffix "-zc-warm$i" "$src_ref"
	warm_secs+=("$run_secs"); warm_rss+=("$run_rss_kib"); warm_cpu+=("$run_cpu")
	accel_bytes=$(skopeo inspect --raw --tls-verify=false "docker://$(jq -r '.targets[0].reference' "$out")" | layer_bytes)
	row accel-warm "$i" "$accel_bytes"

	# Cold: empty store, pull + convert + push to a repository of its own.
	accel_config "$work/accel-cold-$i.yaml" "$work/accel-store-cold-$i"
	timed "$registry_pid" "accel-cold-$i" env NO_COLOR=1 "$accelctl" convert --config "$work/accel-cold-$i.yaml" --driver zstdchunked \
		--option "compression_level=$level" --output json --target "$registry/bench/debian-cold$i:zc" "$src_ref"
	cold_secs+=("$run_secs"); cold_rss+=("$run_rss_kib")
	row accel-cold "$i" "$accel_bytes"

	if [ -n "$skopeo_ok" ]; then
		timed "$registry_pid" "skopeo-$i" "${skopeo_copy[@]}" "docker://$registry/bench/debian-skopeo$i:zc"
		sk_secs+=("$run_secs"); sk_rss+=("$run_rss_kib")
		sk_bytes=$(skopeo inspect --raw --tls-verify=false "docker://$registry/bench/debian-skopeo$i:zc" | layer_bytes)
		row skopeo "$i" "$sk_bytes"
	fi
done

ctr_med=$(median "${ctr_secs[@]}"); warm_med=$(median "${warm_secs[@]}"); cold_med=$(median "${cold_secs[@]}")
rss_max=$(maximum "${warm_rss[@]}" "${cold_rss[@]}")
cat <<EOF

zstd:chunked conversion, accelctl level $level, $runs run(s) per side, $(nproc) core(s)
source: 1 layer, $src_uncompressed bytes of tar, $src_layer_bytes bytes gzip (Debian bookworm minbase)

tool                               best_s  median_s  median_cpu_s   out_bytes  peak_RSS_MiB
ctr-remote convert --zstdchunked $(printf '%8s  %8s  %12s  %10s  %12s' "$(best "${ctr_secs[@]}")" "$ctr_med" "$(median "${ctr_cpu[@]}")" "$ctr_bytes" "$(mib "$(maximum "${ctr_rss[@]}")")")
accelctl convert (warm)          $(printf '%8s  %8s  %12s  %10s  %12s' "$(best "${warm_secs[@]}")" "$warm_med" "$(median "${warm_cpu[@]}")" "$accel_bytes" "$(mib "$(maximum "${warm_rss[@]}")")")
accelctl convert (cold)          $(printf '%8s  %8s  %12s  %10s  %12s' "$(best "${cold_secs[@]}")" "$cold_med" "-" "$accel_bytes" "$(mib "$(maximum "${cold_rss[@]}")")")
EOF
if [ -n "$skopeo_ok" ]; then
	printf 'skopeo copy (pull+push)          %8s  %8s  %12s  %10s  %12s\n' "$(best "${sk_secs[@]}")" "$(median "${sk_secs[@]}")" - "$sk_bytes" "$(mib "$(maximum "${sk_rss[@]}")")"
else
	echo "skopeo: not measured: $skopeo_version cannot write zstd:chunked ($skopeo_why)"
fi
cat <<EOF

warm = source already in accel's store, converted blobs already in the registry (comparable to
       ctr-remote, which converts from containerd's store and pushes nothing); cold = pull +
       convert + push; cpu = user + system seconds, for ctr-remote client plus containerd
EOF
load_note "${loads[@]}"
speed=$(ratio "$ctr_med" "$warm_med")
echo
printf '%-44s %s\n' "speedup vs ctr-remote (median, warm)" "${speed}x (cold: $(ratio "$ctr_med" "$cold_med")x)"
printf '%-44s %s\n' "CPU-time ratio (ctr-remote / warm)" "$(ratio "$(median "${ctr_cpu[@]}")" "$(median "${warm_cpu[@]}")")x"
[ -n "$skopeo_ok" ] && printf '%-44s %s\n' "speedup vs skopeo (median, cold)" "$(ratio "$(median "${sk_secs[@]}")" "$cold_med")x"
printf '%-44s %s\n' "size (accel / ctr-remote)" "$(awk -v a="$accel_bytes" -v b="$ctr_bytes" 'BEGIN { printf "%.4f", a / b }')"
printf '%-44s %s\n' "target: speedup >= ${target_speedup}x (warm, median)" "$(verdict "$speed" ge "$target_speedup")"
printf '%-44s %s\n' "target: peak RSS < ${target_rss_mib} MiB" "$(verdict "$(mib "$rss_max")" lt "$target_rss_mib")"
