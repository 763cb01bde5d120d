#!/usr/bin/env bash
# Installs the system packages mos needs, if missing: cmake and nasm (the
# turbojpeg crate builds libjpeg-turbo from source with them) and wordnet-base
# (WordNet 3.0's database in /usr/share/wordnet, read by mos make-groups
# --strategy taxonomy and by scripts/bench.sh groups). Idempotent.
set -euo pipefail
missing=()
for tool in cmake nasm; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -f /usr/share/wordnet/data.noun ] && [ -f /usr/share/wordnet/index.noun ] || missing+=(wordnet-base)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "[mos] error: missing ${missing[*]}; install them (Debian/Ubuntu: sudo apt-get install ${missing[*]})" >&2
    exit 1
fi
echo "[mos] installing ${missing[*]} with apt-get" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
