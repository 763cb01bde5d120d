#!/usr/bin/env bash
# Set up libtorch (scripts/setup.sh), then build target/release/mos.
# The binary embeds the libtorch library directory, so it runs with no
# environment variables set.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
mos_system_deps
mos_libtorch_env
cd "$here/.."
cargo build --release --locked "$@"
mos_log "built $(pwd)/target/release/mos"
