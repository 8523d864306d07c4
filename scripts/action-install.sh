#!/usr/bin/env bash
# Provides accelctl to the GitHub Action (action.yml), in one of three ways:
#
#   INPUT_ACCELCTL=PATH          a binary already on the runner
#   INPUT_ACCELCTL_VERSION=vX.Y.Z  the release archive of that version, downloaded from
#                                INPUT_ACCELCTL_REPOSITORY's GitHub releases and checked
#                                against its .sha256 file
#   neither                      built from this repository's source with `cargo install`
#
#   action-install.sh resolve    the first two ways: output `accelctl`, the binary's path;
#                                the third: output `cache-dir` and `cache-key`, for a cache
#                                step to restore the build before `action-install.sh build`
#   action-install.sh build      build into CACHE_DIR unless a build is already there;
#                                output `accelctl`
#
# Outputs go to $GITHUB_OUTPUT, or to standard output outside GitHub Actions.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
	printf '::error title=accel install::%s\n' "$*"
	printf 'error: %s\n' "$*" >&2
	exit 1
}

set_output() {
	printf '%s=%s\n' "$1" "$2" >>"${GITHUB_OUTPUT:-/dev/stdout}"
}

# Prints the binary's version, which also proves it runs on this runner.
check_binary() {
	local version
	version=$("$1" --version) || die "$1 does not run on this runner (uname -m: $(uname -m))"
	printf 'using %s: %s\n' "$1" "$version"
}

# Rust's name for this runner's platform, as release archives are named.
target_triple() {
	case "$(uname -s)/$(uname -m)" in
	Linux/x86_64) echo x86_64-unknown-linux-gnu ;;
	Linux/aarch64 | Linux/arm64) echo aarch64-unknown-linux-gnu ;;
	*) die "no accelctl release for $(uname -s)/$(uname -m); leave 'accelctl-version' empty to build from source" ;;
	esac
}

download_release() {
	local version=$1 repository=$2 target archive base dir tmp
	[[ $version == v* ]] || version=v$version
	[ -n "$repository" ] || die "the repository that publishes accelctl releases is unknown; set the input 'accelctl-repository' (owner/name)"
	target=$(target_triple)
	archive=accel-$version-$target.tar.gz
	base=${ACCEL_RELEASE_BASE_URL:-https://github.com/$repository/releases/download}/$version
	dir=${RUNNER_TOOL_CACHE:-${RUNNER_TEMP:-${TMPDIR:-/tmp}}}/accel/$version/$target
	if [ ! -x "$dir/accelctl" ]; then
		tmp=$(mktemp -d)
		# shellcheck disable=SC2064 # expand now: $tmp is local
		trap "rm -rf '$tmp'" EXIT
		printf 'downloading %s/%s\n' "$base" "$archive"
		curl -fsSL --retry 3 -o "$tmp/$archive" "$base/$archive" || die "cannot download $base/$archive"
		curl -fsSL --retry 3 -o "$tmp/$archive.sha256" "$base/$archive.sha256" || die "cannot download $base/$archive.sha256"
		(cd "$tmp" && sha256sum --check --strict --status "$archive.sha256") ||
			die "$archive does not match its .sha256 file"
		mkdir -p "$tmp/x" "$dir"
		tar -xzf "$tmp/$archive" -C "$tmp/x" --strip-components=1
		[ -f "$tmp/x/accelctl" ] || die "$archive has no accelctl"
		install -m 0755 "$tmp/x/accelctl" "$dir/accelctl"
	fi
	check_binary "$dir/accelctl"
	set_output accelctl "$dir/accelctl"
}

# A key that changes whenever anything the binary is built from changes.
source_key() {
	local hash
	hash=$(
		cd "$repo"
		find Cargo.toml Cargo.lock build.rs src -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum
	)
	printf 'accelctl-%s-%s-%s\n' "$(uname -s)" "$(uname -m)" "${hash%% *}"
}

resolve() {
	if [ -n "${INPUT_ACCELCTL:-}" ]; then
		local bin
		bin=$(command -v "$INPUT_ACCELCTL") || die "the input 'accelctl' ($INPUT_ACCELCTL) is not an executable"
		# Later steps may run in another directory.
		[[ $bin == /* ]] || bin=$PWD/$bin
		check_binary "$bin"
		set_output accelctl "$bin"
	elif [ -n "${INPUT_ACCELCTL_VERSION:-}" ]; then
		download_release "$INPUT_ACCELCTL_VERSION" "${INPUT_ACCELCTL_REPOSITORY:-}"
	else
		local key
		key=$(source_key)
		set_output cache-key "$key"
		set_output cache-dir "${RUNNER_TOOL_CACHE:-${RUNNER_TEMP:-${TMPDIR:-/tmp}}}/accel/$key"
	fi
}

build() {
	local dir=${CACHE_DIR:?CACHE_DIR names the build directory}
	if [ -x "$dir/bin/accelctl" ]; then
		printf 'accelctl is already built in %s\n' "$dir"
	else
		command -v cargo >/dev/null ||
			die "cargo is needed to build accelctl from source; install Rust on the runner, or set 'accelctl-version' or 'accelctl'"
		cargo install --locked --path "$repo" --root "$dir" --bin accelctl \
			--target-dir "${RUNNER_TEMP:-${TMPDIR:-/tmp}}/accel-build"
	fi
	check_binary "$dir/bin/accelctl"
	set_output accelctl "$dir/bin/accelctl"
}

case "${1:-}" in
resolve) resolve ;;
build) build ;;
*) die "usage: $0 resolve|build" ;;
esac
