#!/usr/bin/env python3
"""Step outputs and summary of the GitHub Action (action.yml), for scripts/action-convert.sh.

  action-report.py success RESULT_JSON   write the outputs to $GITHUB_OUTPUT and a table of
                                         the targets to $GITHUB_STEP_SUMMARY
  action-report.py failure IMAGE ERROR   write the error (a file) to $GITHUB_STEP_SUMMARY

RESULT_JSON is what `accelctl convert --output json` printed. Outputs:
  references, digests   one line per target, in the same order
  reference, digest     the target, when there is exactly one
  source-digest         digest of the source image
  result                the whole JSON result
Either variable may be unset (outside GitHub Actions); then that part is skipped.
"""

import json
import os
import sys
import uuid


def human_size(n):
    """Binary units with one decimal, as `ls -h` and docker show them: 512 B, 1.5 KiB, 3.2 MiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def code(text):
    """A Markdown code span; references and digests hold no backticks or pipes."""
    return "`" + str(text).replace("`", "'").replace("|", "\\|") + "`"


def append(var, text):
    path = os.environ.get(var)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)


def output(name, value):
    """One output in the multi-line form, which any value can use."""
    while True:
        delimiter = f"ghadelimiter_{uuid.uuid4()}"
        if delimiter not in value:
            break
    return f"{name}<<{delimiter}\n{value}\n{delimiter}\n"


def success(result_path):
    with open(result_path, encoding="utf-8") as f:
        raw = f.read().strip()
    result = json.loads(raw)
    targets = result["targets"]
    outputs = [
        output("references", "\n".join(t["reference"] for t in targets)),
        output("digests", "\n".join(t["digest"] for t in targets)),
        output("source-digest", result["source_digest"]),
        output("result", json.dumps(result, separators=(",", ":"))),
    ]
    if len(targets) == 1:
        outputs.append(output("reference", targets[0]["reference"]))
        outputs.append(output("digest", targets[0]["digest"]))
    append("GITHUB_OUTPUT", "".join(outputs))

    with_platforms = any(t.get("platforms") for t in targets)
    lines = [
        f"### accel: converted {code(result['source'])}",
        "",
        f"Source: {code(result['source'])} {code(result['source_digest'])}, {human_size(result['source_size'])}",
        "",
        "| Format | Reference | Digest | Size |" + (" Platforms |" if with_platforms else ""),
        "| --- | --- | --- | ---: |" + (" --- |" if with_platforms else ""),
    ]
    for t in targets:
        row = f"| {t['driver']} | {code(t['reference'])} | {code(t['digest'])} | {human_size(t['size'])} |"
        if with_platforms:
            row += " " + ", ".join(t.get("platforms") or []) + " |"
        lines.append(row)
    append("GITHUB_STEP_SUMMARY", "\n".join(lines) + "\n\n")

    for t in targets:
        print(f"{t['driver']}: {t['reference']}@{t['digest']} ({human_size(t['size'])})")


def failure(image, error_path):
    with open(error_path, encoding="utf-8", errors="replace") as f:
        error = f.read().strip() or "(no error message)"
    fence = "```"
    while fence in error:
        fence += "`"
    summary = f"### accel: converting {code(image or '(no image)')} failed\n\n{fence}text\n{error}\n{fence}\n\n"
    append("GITHUB_STEP_SUMMARY", summary)


def main(argv):
    if len(argv) == 3 and argv[1] == "success":
        success(argv[2])
    elif len(argv) == 4 and argv[1] == "failure":
        failure(argv[2], argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
