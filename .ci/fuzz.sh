#!/usr/bin/env bash
# Coverage-guided fuzzing: every cargo-fuzz target (libFuzzer, AddressSanitizer) for
# FUZZ_SECS seconds each (default 30), starting from fuzz/seeds/<target>. A crash, leak or
# timeout fails the run; its input is left in fuzz/artifacts/<target>/ and belongs in
# fuzz/seeds/<target>/ once fixed (node/src/fuzz.rs replays the seeds in `cargo test`).
#
# This machine has only the stable toolchain; cargo-fuzz needs -Z flags (sanitizers,
# coverage options), which RUSTC_BOOTSTRAP=1 lets stable rustc take. A long run is the same
# with a larger budget: FUZZ_SECS=3600 bash .ci/fuzz.sh (or one target, see SECURITY.md).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${FUZZ_SECS:-30}
target_dir=${FUZZ_TARGET_DIR:-$PWD/target}
bin=$target_dir/cargo-fuzz-0.13.2
if [ ! -x "$bin/bin/cargo-fuzz" ]; then
  cargo install --quiet --locked cargo-fuzz --version 0.13.2 --root "$bin"
fi
export PATH="$bin/bin:$PATH" RUSTC_BOOTSTRAP=1
cargo fuzz build -O --target-dir "$target_dir"
for t in $(cargo fuzz list); do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  if ! cargo fuzz run -O --target-dir "$target_dir" "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz: $t failed; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  echo "fuzz: $t ok: $runs runs in ${secs} s, $cov, corpus $(ls "corpus/$t" | wc -l) inputs"
  rm -f "$log"
done
