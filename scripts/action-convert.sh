#!/usr/bin/env bash
# The conversion step of the GitHub Action (action.yml): runs `accelctl convert --output json`
# and reports the result as step outputs ($GITHUB_OUTPUT) and a Markdown table
# ($GITHUB_STEP_SUMMARY). On failure it exits non-zero and puts the error in the summary.
#
# Inputs, as action.yml passes them in the environment:
#   INPUT_IMAGE       image to convert (required)
#   INPUT_DRIVERS     target formats, separated by commas, spaces or newlines
#   INPUT_OPTIONS     driver options, one KEY=VALUE per line (blank and # lines are skipped)
#   INPUT_TAG_SUFFIX  tag suffix of the targets
#   INPUT_TARGET      exact target reference
#   INPUT_PLATFORMS   platforms, separated by commas, spaces or newlines
#   INPUT_REGISTRY    host the credentials are for (default: the image's registry)
#   INPUT_USERNAME, INPUT_PASSWORD   registry credentials
#   INPUT_INSECURE    hosts to reach over plain HTTP or unverified TLS
#   ACCELCTL          the accelctl binary (default: accelctl on PATH)
#
# Credentials never reach a command line or a file: the generated config refers to
# ${INPUT_USERNAME} and ${INPUT_PASSWORD}, which accelctl reads from its environment.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
image=${INPUT_IMAGE:-}
accelctl=${ACCELCTL:-accelctl}
username=${INPUT_USERNAME:-}
password=${INPUT_PASSWORD:-}

# Mask every line of the password in the job log before anything can print it.
if [ -n "$password" ]; then
	while IFS= read -r line; do
		[ -n "$line" ] && printf '::add-mask::%s\n' "$line"
	done <<<"$password"
fi

work=$(mktemp -d "${RUNNER_TEMP:-${TMPDIR:-/tmp}}/accel-action.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Reports a failure as a workflow error annotation and in the step summary, then exits 1.
# $1 is a file holding the error text.
fail_with() {
	local text
	text=$(cat "$1")
	# Workflow commands end at a newline; '%' must be escaped first.
	text=${text//'%'/'%25'}
	text=${text//$'\r'/'%0D'}
	text=${text//$'\n'/'%0A'}
	printf '::error title=accel convert::%s\n' "$text"
	if ! python3 "$here/action-report.py" failure "$image" "$1" && [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
		# shellcheck disable=SC2016 # the backticks are Markdown
		printf '### accel: converting `%s` failed\n\nSee the job log.\n' "$image" >>"$GITHUB_STEP_SUMMARY"
	fi
	exit 1
}

fail() {
	printf 'error: %s\n' "$*" | tee "$work/error" >&2
	fail_with "$work/error"
}

# Splits a list given as commas, spaces or newlines into one item per line.
items() {
	tr -s ',[:space:]' '[\n*]' <<<"$1" | sed '/^$/d'
}

# A registry host as it appears in image references: host or host:port, or [v6]:port.
valid_host() {
	[[ $1 =~ ^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]+)?$ ]]
}

# The registry host of an image reference, following Docker's rule: the first path
# component is a host if it has a '.' or ':' or is 'localhost'; otherwise it is Docker Hub.
image_host() {
	local first=${1%%/*}
	if [ "$first" != "$1" ] && { [[ $first == *[.:]* ]] || [ "$first" = localhost ]; }; then
		printf '%s\n' "$first"
	else
		printf 'docker.io\n'
	fi
}

# JSON string literal of $1, with '$' doubled so that accelctl's ${VAR} expansion keeps it.
config_string() {
	local s=${1//\\/\\\\}
	s=${s//\"/\\\"}
	s=${s//\$/\$\$}
	printf '"%s"' "$s"
}

[ -n "$image" ] || fail "the input 'image' is empty; name the image to convert (host/repository:tag)"
command -v python3 >/dev/null || fail "python3 is needed to write the step outputs and summary; install it on the runner"
if ! command -v "$accelctl" >/dev/null; then
	fail "accelctl not found (ACCELCTL=$accelctl); let the action build it, or set the input 'accelctl' to a binary"
fi
if [ -n "$username" ] && [ -z "$password" ]; then
	fail "the input 'username' is set but 'password' is empty; give both, or neither to use ~/.docker/config.json"
fi
if [ -z "$username" ] && [ -n "$password" ]; then
	fail "the input 'password' is set but 'username' is empty; give both, or neither to use ~/.docker/config.json"
fi

# Registry entries of the config, by lower-cased host.
declare -A entries=()
if [ -n "$username" ]; then
	host=${INPUT_REGISTRY:-$(image_host "$image")}
	host=${host#https://}
	host=${host#http://}
	host=${host%%/*}
	valid_host "$host" || fail "the input 'registry' ($host) is not a registry host (host or host:port)"
	# Quoted so that the config holds the references, not the values.
	# shellcheck disable=SC2016
	entries[${host,,}]='"username": "${INPUT_USERNAME}", "password": "${INPUT_PASSWORD}"'
fi
while IFS= read -r host; do
	valid_host "$host" || fail "'$host' in the input 'insecure' is not a registry host (host or host:port)"
	key=${host,,}
	entries[$key]="${entries[$key]:+${entries[$key]}, }\"insecure\": true"
done < <(items "${INPUT_INSECURE:-}")

# The config is JSON, which YAML reads as is. The store lives for the job, so later steps
# converting related images reuse its blobs.
{
	printf '{\n  "store": {"kind": "embedded", "path": %s},\n  "registries": {' \
		"$(config_string "${RUNNER_TEMP:-$work}/accel-store")"
	sep=
	for key in "${!entries[@]}"; do
		printf '%s\n    "%s": {%s}' "$sep" "$key" "${entries[$key]}"
		sep=,
	done
	printf '\n  }\n}\n'
} >"$work/config.yaml"

args=(convert --config "$work/config.yaml" --output json)
while IFS= read -r driver; do
	args+=(--driver "$driver")
done < <(items "${INPUT_DRIVERS:-}")
while IFS= read -r option; do
	option=${option#"${option%%[![:space:]]*}"}
	option=${option%"${option##*[![:space:]]}"}
	[ -z "$option" ] || [[ $option == '#'* ]] || args+=(--option "$option")
done <<<"${INPUT_OPTIONS:-}"
[ -z "${INPUT_TAG_SUFFIX:-}" ] || args+=("--tag-suffix=$INPUT_TAG_SUFFIX")
[ -z "${INPUT_TARGET:-}" ] || args+=(--target "$INPUT_TARGET")
while IFS= read -r platform; do
	args+=(--platform "$platform")
done < <(items "${INPUT_PLATFORMS:-}")
args+=(-- "$image")

printf 'accelctl %s\n' "${args[*]}"
# Logs stream to the job log as they come, and are kept for the summary if the command fails.
status=0
"$accelctl" "${args[@]}" 2>&1 >"$work/result.json" | tee "$work/stderr" >&2 || status=$?
if [ "$status" -ne 0 ]; then
	# accelctl's error is its last "error:" line and what follows; if it died without one,
	# the end of its output is the best clue.
	if grep -q '^error: ' "$work/stderr"; then
		awk '/^error: /{buf=""} /^error: /,0{buf=buf $0 "\n"} END{printf "%s", buf}' "$work/stderr" >"$work/error"
	else
		{
			printf 'accelctl exited with status %s\n' "$status"
			tail -n 20 "$work/stderr"
		} >"$work/error"
	fi
	fail_with "$work/error"
fi

if ! python3 "$here/action-report.py" success "$work/result.json"; then
	fail "could not report the result of accelctl: $(head -c 2000 "$work/result.json")"
fi
