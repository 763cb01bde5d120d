#!/usr/bin/env bash
# The project's test command (CI runs exactly this): set up libtorch, check
# formatting and lints, run every test in release mode.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
mos_system_deps
mos_libtorch_env
cd "$here/.."
mos_log "cargo fmt --check"
cargo fmt --all -- --check
mos_log "cargo clippy"
cargo clippy --release --locked --all-targets -- -D warnings
mos_log "cargo test"
cargo test --release --locked
