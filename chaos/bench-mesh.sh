#!/usr/bin/env bash
# The data-plane benchmark, reproducible on a fresh Debian machine: installs HAProxy if
# missing, builds release binaries, runs trellis-chaos bench-mesh. Extra args go to it
# (e.g. --secs 5 --rates 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v haproxy >/dev/null || { apt-get update -qq && apt-get install -y -qq haproxy; }
ulimit -n 65536 2>/dev/null || ulimit -n 20000
cargo build --release --locked -p trellis-node --bin trellis -p trellis-chaos --bin trellis-chaos
TRELLIS_BIN=target/release/trellis exec target/release/trellis-chaos bench-mesh "$@"
