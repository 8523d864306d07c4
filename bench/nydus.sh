#!/usr/bin/env bash
# Side-by-side Nydus benchmark: converts the same real Debian image with accelctl and with
# nydus's own tool (`nydus-image create --type tar-rafs`, then `nydus-image merge`, as nydusify
# drives it) in one run on this machine; prints times, CPU, output sizes, peak memory and ratios.
# nydus-image runs twice per round: fed the image's gzip layer through a pipe (decompressed by
# gzip on the way, as a converter of registry images must), and on the plain tar from disk.
#
#   bench/nydus.sh [--runs N] [--fs-version 5|6] [--keep]
#
#   --runs N        runs of each side (default 2); best and median are reported, every run printed
#   --fs-version V  RAFS version on both sides (default 6)
#   --keep          keep the work directory (logs, stores, registry data) and print its path
#
# nydus-image is installed once with `cargo install --locked nydus-rs --version $NYDUS_VERSION`
# into $NYDUS_ROOT (default /usr/local/lib/accel-bench/nydus-$NYDUS_VERSION); that build takes
# 20 minutes or more, later runs reuse it.
# Environment: ACCEL_FIXTURE_CACHE, ACCEL_BENCH_TMP, CARGO_TARGET_DIR as for bench/estargz.sh;
# ACCELCTL=PATH uses that accelctl build instead of building one.
# Needs root. Exits 0 whether or not the targets are met; non-zero only when something failed.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NYDUS_VERSION=${NYDUS_VERSION:-2.2.0}
NYDUS_ROOT=${NYDUS_ROOT:-/usr/local/lib/accel-bench/nydus-$NYDUS_VERSION}
runs=2
fs_version=6
target_speedup=1
target_rss_mib=256

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
	case $1 in
		--runs) runs=${2:?}; shift 2 ;;
		--fs-version) fs_version=${2:?}; shift 2 ;;
		--keep) keep=1; shift ;;
		-h | --help) usage 0 ;;
		*) log "unknown argument $1"; usage 2 >&2 ;;
	esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "--runs wants a positive number, got $runs"
[[ $fs_version =~ ^[56]$ ]] || die "--fs-version is 5 or 6, got $fs_version"

# The pinned nydus-image, built once (cmake, perl and make build its vendored C libraries).
packages=(cmake perl make gcc)
bench_setup
nydus_image=$NYDUS_ROOT/bin/nydus-image
if [ ! -x "$nydus_image" ]; then
	log "installing nydus-image $NYDUS_VERSION into $NYDUS_ROOT (cargo install; this takes a while)"
	cargo install --locked --quiet nydus-rs --version "$NYDUS_VERSION" --root "$NYDUS_ROOT" --bin nydus-image ||
		die "cargo install nydus-rs $NYDUS_VERSION failed"
fi
nydus_version=$("$nydus_image" --version 2>&1 | head -n 3 | tr '\n' ' ')

start_registry
src_ref=$registry/bench/debian:src
log "pushing the source image built from $fixture"
push_debian_image "$src_ref"
log "source: $src_ref, $src_uncompressed bytes of tar, $src_layer_bytes bytes gzip"

warm_config=$work/accel-warm.yaml
accel_config "$warm_config" "$work/accel-store-warm"
log "accelctl: filling the warm store and the registry (not timed)"
timed "$registry_pid" accel-prime env NO_COLOR=1 "$accelctl" convert --config "$warm_config" --driver nydus \
	--option "fs_version=$fs_version" --output json "$src_ref"

declare -a loads=() gz_secs=() gz_rss=() gz_cpu=() ny_secs=() ny_rss=() ny_cpu=() warm_secs=() warm_rss=() warm_cpu=() cold_secs=() cold_rss=()
ny_bytes='' accel_bytes=''
printf '\n%-11s %-4s %9s %9s %9s %11s %8s\n' side run seconds cpu_s server_s out_bytes rss_MiB
row() { printf '%-11s %-4s %9s %9s %9s %11s %8s\n' "$1" "$2" "$run_secs" "$run_cpu" "$run_server_cpu" "$3" "$(mib "$run_rss_kib")"; }

for i in $(seq "$runs"); do
	loads+=("$(cut -d' ' -f1 /proc/loadavg)")

	# nydus-image fed the registry's gzip layer, decompressed into a pipe as it reads.
	d=$work/nydus-gz-$i
	mkdir -p "$d/blobs"
	mkfifo "$d/layer.tar"
	# shellcheck disable=SC2016 # expanded by the inner shell
	timed "$registry_pid" "nydus-gz-create-$i" bash -c 'gzip -dc <"$1" >"$2" & z=$!
		"$3" create --type tar-rafs --fs-version "$4" --compressor zstd --chunk-size 0x100000 \
			--bootstrap "$5/layer.boot" --blob-dir "$5/blobs" "$2" || exit 1
		wait "$z"' _ "$src_layer_file" "$d/layer.tar" "$nydus_image" "$fs_version" "$d"
	c_secs=$run_secs c_cpu=$run_cpu c_rss=$run_rss_kib
	timed "$registry_pid" "nydus-gz-merge-$i" "$nydus_image" merge --bootstrap "$d/image.boot" "$d/layer.boot"
	run_secs=$(awk -v a="$c_secs" -v b="$run_secs" 'BEGIN { printf "%.2f", a + b }')
	run_cpu=$(awk -v a="$c_cpu" -v b="$run_cpu" 'BEGIN { printf "%.2f", a + b }')
	run_rss_kib=$(maximum "$c_rss" "$run_rss_kib")
	run_server_cpu=0
	gz_secs+=("$run_secs"); gz_rss+=("$run_rss_kib"); gz_cpu+=("$run_cpu")
	row nydus-gz "$i" "$(( $(cat "$d"/blobs/* | wc -c) + $(gzip -c "$d/image.boot" | wc -c) ))"
	rm -rf "$d"

	# nydus-image on the plain tar from disk: create (the layer's blob and bootstrap), then merge.
	d=$work/nydus-$i
	mkdir -p "$d/blobs"
	timed "$registry_pid" "nydus-create-$i" "$nydus_image" create --type tar-rafs --fs-version "$fs_version" \
		--compressor zstd --chunk-size 0x100000 --bootstrap "$d/layer.boot" --blob-dir "$d/blobs" "$fixture"
	c_secs=$run_secs c_cpu=$run_cpu c_rss=$run_rss_kib
	timed "$registry_pid" "nydus-merge-$i" "$nydus_image" merge --bootstrap "$d/image.boot" "$d/layer.boot"
	run_secs=$(awk -v a="$c_secs" -v b="$run_secs" 'BEGIN { printf "%.2f", a + b }')
	run_cpu=$(awk -v a="$c_cpu" -v b="$run_cpu" 'BEGIN { printf "%.2f", a + b }')
	run_rss_kib=$(maximum "$c_rss" "$run_rss_kib")
	run_server_cpu=0
	ny_secs+=("$run_secs"); ny_rss+=("$run_rss_kib"); ny_cpu+=("$run_cpu")
	ny_bytes=$(( $(cat "$d"/blobs/* | wc -c) + $(gzip -c "$d/image.boot" | wc -c) ))
	row nydus-image "$i" "$ny_bytes"

	# Warm: the source is in accel's store and the registry has the converted blobs, like
	# nydus-image reading the tar from disk and pushing nothing.
	timed "$registry_pid" "accel-warm-$i" env NO_COLOR=1 "$accelctl" convert --config "$warm_config" --driver nydus \
		--option "fs_version=$fs_version" --output json --tag-suffix "-nydus-warm$i" "$src_ref"
	warm_secs+=("$run_secs"); warm_rss+=("$run_rss_kib"); warm_cpu+=("$run_cpu")
	accel_bytes=$(skopeo inspect --raw --tls-verify=false "docker://$(jq -r '.targets[0].reference' "$out")" | layer_bytes)
	row accel-warm "$i" "$accel_bytes"

	# Cold: empty store, pull + convert + push to a repository of its own.
	accel_config "$work/accel-cold-$i.yaml" "$work/accel-store-cold-$i"
	timed "$registry_pid" "accel-cold-$i" env NO_COLOR=1 "$accelctl" convert --config "$work/accel-cold-$i.yaml" --driver nydus \
		--option "fs_version=$fs_version" --output json --target "$registry/bench/debian-cold$i:nydus" "$src_ref"
	cold_secs+=("$run_secs"); cold_rss+=("$run_rss_kib")
	row accel-cold "$i" "$accel_bytes"
	rm -rf "$d"
done

gz_med=$(median "${gz_secs[@]}"); ny_med=$(median "${ny_secs[@]}"); warm_med=$(median "${warm_secs[@]}"); cold_med=$(median "${cold_secs[@]}")
rss_max=$(maximum "${warm_rss[@]}" "${cold_rss[@]}")
cat <<EOF

Nydus conversion (RAFS v$fs_version, zstd, 1 MiB chunks), $runs run(s) per side, $(nproc) core(s)
source: 1 layer, $src_uncompressed bytes of tar, $src_layer_bytes bytes gzip (Debian bookworm minbase)
reference: $nydus_version

tool                               best_s  median_s  median_cpu_s   out_bytes  peak_RSS_MiB
nydus-image, gzip layer piped    $(printf '%8s  %8s  %12s  %10s  %12s' "$(best "${gz_secs[@]}")" "$gz_med" "$(median "${gz_cpu[@]}")" "$ny_bytes" "$(mib "$(maximum "${gz_rss[@]}")")")
nydus-image, plain tar on disk   $(printf '%8s  %8s  %12s  %10s  %12s' "$(best "${ny_secs[@]}")" "$ny_med" "$(median "${ny_cpu[@]}")" "$ny_bytes" "$(mib "$(maximum "${ny_rss[@]}")")")
accelctl convert (warm)          $(printf '%8s  %8s  %12s  %10s  %12s' "$(best "${warm_secs[@]}")" "$warm_med" "$(median "${warm_cpu[@]}")" "$accel_bytes" "$(mib "$(maximum "${warm_rss[@]}")")")
accelctl convert (cold)          $(printf '%8s  %8s  %12s  %10s  %12s' "$(best "${cold_secs[@]}")" "$cold_med" "-" "$accel_bytes" "$(mib "$(maximum "${cold_rss[@]}")")")

nydus-image writes local files and pushes nothing; "gzip layer piped" gets the image's gzip
layer decompressed by gzip into a pipe (the work any converter of registry images does),
"plain tar on disk" the uncompressed tar (a lower bound: no decompression at all). accelctl
(warm) reads the gzip layer from its store, decompresses it, checks its diff_id, and pushes the
manifest (its blobs are already in the registry); cold = pull + convert + push. out_bytes:
blobs plus the gzip bootstrap.
EOF
load_note "${loads[@]}"
speed=$(ratio "$gz_med" "$warm_med")
echo
printf '%-48s %s\n' "speedup vs nydus-image, gzip layer (median)" "${speed}x warm (cold: $(ratio "$gz_med" "$cold_med")x)"
printf '%-48s %s\n' "speedup vs nydus-image, plain tar (median)" "$(ratio "$ny_med" "$warm_med")x warm (cold: $(ratio "$ny_med" "$cold_med")x)"
printf '%-48s %s\n' "CPU-time ratio (gzip-fed nydus-image / warm)" "$(ratio "$(median "${gz_cpu[@]}")" "$(median "${warm_cpu[@]}")")x"
printf '%-48s %s\n' "CPU-time ratio (plain-tar nydus-image / warm)" "$(ratio "$(median "${ny_cpu[@]}")" "$(median "${warm_cpu[@]}")")x"
printf '%-48s %s\n' "peak RSS ratio (nydus-image / warm)" "$(ratio "$(maximum "${ny_rss[@]}")" "$(maximum "${warm_rss[@]}")")x"
printf '%-48s %s\n' "size (accel / nydus-image)" "$(awk -v a="$accel_bytes" -v b="$ny_bytes" 'BEGIN { printf "%.4f", a / b }')"
printf '%-48s %s\n' "target: speedup >= ${target_speedup}x (gzip layer, warm, median)" "$(verdict "$speed" ge "$target_speedup")"
printf '%-48s %s\n' "target: peak RSS < ${target_rss_mib} MiB" "$(verdict "$(mib "$rss_max")" lt "$target_rss_mib")"
