#!/usr/bin/env bash
# Installs the system tools the build needs, if missing: cmake and nasm (the
# turbojpeg crate builds libjpeg-turbo from source with them). Idempotent.
set -euo pipefail
missing=()
for tool in cmake nasm; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "[mos] error: missing ${missing[*]}; install them (Debian/Ubuntu: sudo apt-get install cmake nasm)" >&2
    exit 1
fi
echo "[mos] installing ${missing[*]} with apt-get" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
