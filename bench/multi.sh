#!/usr/bin/env bash
# Several formats from one pull: one `accelctl convert --driver estargz,zstdchunked,zstd`
# against three separate `accelctl convert --driver X` runs of the same real Debian image, in
# one run on this machine; prints times, peak memory and the ratios bench/README.md targets.
#
#   bench/multi.sh [--runs N] [--drivers LIST] [--cold] [--rate RATE] [--keep]
#
#   --runs N        runs of each side (default 2); best and median are reported
#   --drivers LIST  comma-separated drivers (default estargz,zstdchunked,zstd)
#   --cold          each run starts from an empty store, so the separate runs pull once each
#                   (default: warm, the source already in the store, which isolates the
#                   conversion: one decode feeding every driver against one decode per driver)
#   --rate RATE     with --cold (implied): the registry's replies are limited to RATE (tc units,
#                   e.g. 1gbit, 400mbit), so a pull costs what it costs across a network link
#                   instead of from loopback; pushes are not limited
#   --keep          keep the work directory and print its path
#
# Environment: ACCEL_FIXTURE_CACHE, ACCEL_BENCH_TMP, CARGO_TARGET_DIR as for bench/estargz.sh;
# ACCELCTL=PATH uses that accelctl build instead of building one.
# Needs root. Exits 0 whether or not the targets are met; non-zero only when something failed.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=2
drivers=estargz,zstdchunked,zstd
cold=
rate=
target_speedup=1.5
target_rss_mib=256

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
	case $1 in
		--runs) runs=${2:?}; shift 2 ;;
		--drivers) drivers=${2:?}; shift 2 ;;
		--cold) cold=1; shift ;;
		--rate) rate=${2:?}; cold=1; shift 2 ;;
		--keep) keep=1; shift ;;
		-h | --help) usage 0 ;;
		*) log "unknown argument $1"; usage 2 >&2 ;;
	esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "--runs wants a positive number, got $runs"
IFS=, read -r -a each <<<"$drivers"
[ ${#each[@]} -ge 2 ] || die "--drivers wants at least two drivers, got $drivers"

packages=()
[ -n "$rate" ] && packages+=(iproute2)
bench_setup
start_registry
src_ref=$registry/bench/debian:src
log "pushing the source image built from $fixture"
push_debian_image "$src_ref"
log "source: $src_ref, $src_uncompressed bytes of tar, $src_layer_bytes bytes gzip"

warm_config=$work/accel-warm.yaml
accel_config "$warm_config" "$work/accel-store-warm"
# Untimed: fills the store and puts every converted blob in the registry, so all timed runs
# push the same (existence checks and manifests).
log "filling the store and the registry (not timed)"
timed "$registry_pid" prime env NO_COLOR=1 "$accelctl" convert --config "$warm_config" --driver "$drivers" --output json "$src_ref"

pull_note=
if [ -n "$rate" ]; then
	throttle_registry "$rate"
	# One plain download of the source layer, to show what a pull costs at this rate.
	layer_digest=$(skopeo inspect --raw --tls-verify=false "docker://$src_ref" | jq -r '.layers[0].digest')
	t0=$(now)
	curl -fsS -o /dev/null "http://$registry/v2/bench/debian/blobs/$layer_digest" || die "could not download the source layer"
	t1=$(now)
	pull_note=$(awk -v a="$t0" -v b="$t1" -v n="$src_layer_bytes" \
		'BEGIN { printf "one download of the source layer: %.2f s (%.1f MB/s)", b - a, n / (b - a) / 1e6 }')
	log "$pull_note"
fi

config_for() {
	if [ -n "$cold" ]; then
		accel_config "$work/accel-$1.yaml" "$work/accel-store-$1"
		echo "$work/accel-$1.yaml"
	else
		echo "$warm_config"
	fi
}

declare -a loads=() one_secs=() one_cpu=() one_rss=() sep_secs=() sep_cpu=() sep_rss=()
printf '\n%-10s %-4s %9s %9s %8s  %s\n' side run seconds cpu_s rss_MiB notes
for i in $(seq "$runs"); do
	loads+=("$(cut -d' ' -f1 /proc/loadavg)")
	timed "$registry_pid" "one-$i" env NO_COLOR=1 "$accelctl" convert --config "$(config_for "one-$i")" \
		--driver "$drivers" --output json "$src_ref"
	n=$(jq '.targets | length' "$out")
	[ "$n" = "${#each[@]}" ] || die "one command made $n targets, not ${#each[@]}"
	one_secs+=("$run_secs"); one_cpu+=("$run_cpu"); one_rss+=("$run_rss_kib")
	printf '%-10s %-4s %9s %9s %8s  %s\n' one "$i" "$run_secs" "$run_cpu" "$(mib "$run_rss_kib")" "$drivers"

	secs=() cpu=() rss=()
	for d in "${each[@]}"; do
		timed "$registry_pid" "sep-$i-$d" env NO_COLOR=1 "$accelctl" convert --config "$(config_for "sep-$i-$d")" \
			--driver "$d" --output json "$src_ref"
		secs+=("$run_secs"); cpu+=("$run_cpu"); rss+=("$run_rss_kib")
		printf '%-10s %-4s %9s %9s %8s  %s\n' separate "$i" "$run_secs" "$run_cpu" "$(mib "$run_rss_kib")" "$d"
	done
	sep_secs+=("$(sum "${secs[@]}")"); sep_cpu+=("$(sum "${cpu[@]}")"); sep_rss+=("$(maximum "${rss[@]}")")
	printf '%-10s %-4s %9s %9s %8s  %s\n' separate "$i" "${sep_secs[-1]}" "${sep_cpu[-1]}" "$(mib "${sep_rss[-1]}")" "sum of ${#each[@]} runs"
done

one_med=$(median "${one_secs[@]}"); sep_med=$(median "${sep_secs[@]}")
one_rss_max=$(maximum "${one_rss[@]}")
speed=$(ratio "$sep_med" "$one_med")
cat <<EOF

$drivers from one command vs ${#each[@]} separate commands, $([ -n "$cold" ] && echo "cold (empty store each)" || echo "warm (source in the store)"), $runs run(s), $(nproc) core(s)
source: 1 layer, $src_uncompressed bytes of tar, $src_layer_bytes bytes gzip (Debian bookworm minbase)
registry: loopback$([ -n "$rate" ] && echo ", replies limited to $rate; $pull_note")

side                 best_s  median_s  median_cpu_s  peak_RSS_MiB
one command        $(printf '%8s  %8s  %12s  %12s' "$(best "${one_secs[@]}")" "$one_med" "$(median "${one_cpu[@]}")" "$(mib "$one_rss_max")")
separate (sum)     $(printf '%8s  %8s  %12s  %12s' "$(best "${sep_secs[@]}")" "$sep_med" "$(median "${sep_cpu[@]}")" "$(mib "$(maximum "${sep_rss[@]}")")")
EOF
load_note "${loads[@]}"
echo
printf '%-40s %s\n' "speedup (separate s / one s, median)" "${speed}x"
printf '%-40s %s\n' "CPU-time ratio (separate / one)" "$(ratio "$(median "${sep_cpu[@]}")" "$(median "${one_cpu[@]}")")x"
printf '%-40s %s\n' "target: speedup >= ${target_speedup}x" "$(verdict "$speed" ge "$target_speedup")"
printf '%-40s %s\n' "target: peak RSS < ${target_rss_mib} MiB" "$(verdict "$(mib "$one_rss_max")" lt "$target_rss_mib")"
