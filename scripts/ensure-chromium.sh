#!/usr/bin/env bash
# Make sure a headless-capable Chromium is installed (tests/test_report_render.py renders the HTML
# report in it). Idempotent: does nothing when a chromium binary is already on this machine;
# otherwise installs Debian's `chromium` with apt-get (needs root or sudo). Prints one line.
set -euo pipefail

find_chromium() {
    local candidate
    if [ -n "${LORA_DOCTOR_CHROMIUM:-}" ] && [ -x "${LORA_DOCTOR_CHROMIUM}" ]; then
        echo "${LORA_DOCTOR_CHROMIUM}"
        return 0
    fi
    for candidate in /usr/bin/chromium /usr/bin/chromium-browser chromium chromium-browser; do
        if command -v "$candidate" >/dev/null 2>&1; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if found=$(find_chromium); then
    echo "ensure-chromium: found $found"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: no chromium binary and no apt-get; install Chromium yourself (or set LORA_DOCTOR_CHROMIUM)" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "ensure-chromium: no chromium binary; run as root: apt-get update && apt-get install -y chromium" >&2
        exit 1
    fi
fi

start=$(date +%s)
log=$(mktemp)
if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
       && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    rm -f "$log"
    echo "ensure-chromium: apt-get install chromium failed (see above)" >&2
    exit 1
fi
rm -f "$log"

if found=$(find_chromium); then
    echo "ensure-chromium: installed $found ($("$found" --version 2>/dev/null | head -n 1)) in $(( $(date +%s) - start )) s"
else
    echo "ensure-chromium: apt-get installed chromium but no chromium binary was found" >&2
    exit 1
fi
