#!/usr/bin/env bash
# Refreshes the PGO profile that release builds use (pgo/README.md):
#   1. builds an instrumented release binary (target/pgo-train);
#   2. runs it under bench/bench.py's load, one short round of each case:
#      plain route, keyed route, forged and mistyped keys, 1 worker and the
#      default, idle and burst connections, and with --redis (the default when
#      redis-server is installed) the hybrid and redis rate-limit modes;
#   3. merges what the processes wrote into pgo/portcullis.profdata, records
#      the LLVM it was made with, and renames the cfg in .cargo/config.toml
#      so that cargo rebuilds release artifacts with the new profile.
# Then commit pgo/ and .cargo/config.toml. About 12 minutes on 2 CPUs.
# Needs nginx and wrk (bench/run.sh installs them) and rustup's llvm-tools
# component (added here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"

for tool in nginx wrk python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "pgo/train.sh: $tool is missing (bench/run.sh installs it)" >&2; exit 1; }
done
redis=()
command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && redis=(--redis)

# PGO is linked to the compiler: the pass that reads the profile is LLVM's.
sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
llvm=$(rustc -vV | sed -n 's/^LLVM version: //p')
profdata="$sysroot/lib/rustlib/$host/bin/llvm-profdata"
[ -x "$profdata" ] || rustup component add llvm-tools
[ -x "$profdata" ] || { echo "pgo/train.sh: no llvm-profdata at $profdata" >&2; exit 1; }

target=target/pgo-train
raw="$PWD/$target/profraw"
rm -rf "$raw"
echo "pgo: instrumented build ($target)"
RUSTFLAGS="-Cprofile-generate=$raw" cargo build --release --locked --target-dir "$target"

echo "pgo: training run (bench/bench.py, one round; log in $target/train.log)"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# %p: one file per process (gateways, and the `keys create` the bench runs).
LLVM_PROFILE_FILE="$raw/%p.profraw" python3 bench/bench.py --bin "$target/release/portcullis" \
  --rounds 1 --duration 3 --conns 2000 "${redis[@]}" > "$target/train.log" 2>&1 \
  || { tail -20 "$target/train.log" >&2; exit 1; }
ls "$raw"/*.profraw >/dev/null 2>&1 || { echo "pgo/train.sh: the run wrote no profile" >&2; exit 1; }

# Sparse: code the run never reached gets no profile, so it is optimised as
# without PGO rather than as cold.
"$profdata" merge --sparse -o pgo/portcullis.profdata "$raw"/*.profraw
echo "$llvm" > pgo/llvm-version
digest=$(sha256sum pgo/portcullis.profdata | cut -c1-12)
sed -i "s/pgo_profile_[0-9a-f]*/pgo_profile_$digest/" .cargo/config.toml
grep -q "pgo_profile_$digest" .cargo/config.toml || { echo "pgo/train.sh: could not update .cargo/config.toml" >&2; exit 1; }
echo "pgo: wrote pgo/portcullis.profdata ($(wc -c < pgo/portcullis.profdata) bytes, LLVM $llvm, cfg pgo_profile_$digest)"
