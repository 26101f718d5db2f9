#!/usr/bin/env bash
# The data-plane benchmark, reproducible on a fresh Debian machine: installs nginx (the
# instance), HAProxy (the peer) and a pinned oha (the generator) if missing, builds release
# binaries, runs trellis-chaos bench-mesh. Extra args go to it (e.g. --secs 5 --rates 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
OHA_VERSION=1.16.0
missing=""
command -v haproxy >/dev/null || missing="$missing haproxy"
command -v nginx >/dev/null || missing="$missing nginx-light"
if [ -n "$missing" ]; then apt-get update -qq && apt-get install -y -qq $missing; fi
if ! target/tools/bin/oha --version 2>/dev/null | grep -q "$OHA_VERSION"; then
  cargo install oha --version "$OHA_VERSION" --locked --root target/tools
fi
ulimit -n 65536 2>/dev/null || ulimit -n 20000
# Two builds: the agent as an operator gets it (without the harness's fault-injection feature).
cargo build --release --locked -p trellis-node --bin trellis
cargo build --release --locked -p trellis-chaos --bin trellis-chaos
OHA=target/tools/bin/oha TRELLIS_BIN=target/release/trellis exec target/release/trellis-chaos bench-mesh "$@"
