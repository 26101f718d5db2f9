#!/usr/bin/env bash
# The DNS benchmark, reproducible on a fresh Debian machine: installs dnsperf (the generator)
# and dnsmasq (the peer) if missing, builds release binaries, runs trellis-chaos bench-dns.
# Extra args go to it (e.g. --secs 10 --rate 20000).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=""
command -v dnsperf >/dev/null || missing="$missing dnsperf"
command -v dnsmasq >/dev/null || missing="$missing dnsmasq-base"
command -v taskset >/dev/null || missing="$missing util-linux"
if [ -n "$missing" ]; then apt-get update -qq && apt-get install -y -qq $missing; fi
cargo build --release --locked -p trellis-node --bin trellis
cargo build --release --locked -p trellis-chaos --bin trellis-chaos
TRELLIS_BIN=target/release/trellis exec target/release/trellis-chaos bench-dns "$@"
