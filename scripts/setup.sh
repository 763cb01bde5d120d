#!/usr/bin/env bash
# Provision everything mos needs to build; idempotent (a second run downloads nothing).
# Usage: scripts/setup.sh            (prints the LIBTORCH in use)
#        source scripts/setup.sh     (also exports LIBTORCH into your shell)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
mos_system_deps
mos_libtorch_env
mos_log "libtorch: $LIBTORCH"
