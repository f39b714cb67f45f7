#!/usr/bin/env bash
# portcullis benchmark, run by hand (not in CI). Compares portcullis with nginx
# proxy_pass on the same nginx upstream, all on loopback:
#   - requests/s, latency and CPU µs per request (wrk -t1 -c32): nginx (one
#     worker), portcullis plain route (auth = "none"), keyed route (valid key),
#     invalid keys (forged with a valid checksum, and mistyped); plain and keyed
#     again on a portcullis with `workers = 1`, like for like with the nginx;
#     and the floor: a bare hyper proxy in the gateway's shape doing none of its
#     work (examples/hyper_floor.rs), to tell hyper's cost from the gateway's;
#   - RSS per idle keep-alive connection (10,000 connections), portcullis and nginx;
#   - RSS per connection after a burst of 4,000 (every request sent before any
#     answer is read, as ../shared/acceptance/perf does), on a fresh gateway.
# With --redis it also measures the keyed path in rate_limit.mode = "hybrid" and
# "redis" on a local redis-server (hybrid also with `workers = 1`, like for like),
# with Redis commands per request. With
# --instructions it counts instructions per request under callgrind (nginx,
# the floor and portcullis): user space only, but the same from run to run, so
# a small change shows through the machine's noise.
#
#   bench/run.sh [--redis] [--instructions] [--duration SECS] [--rounds N] [--conns N] [--keep]
#
# With --sweep it measures the cost curve instead (bench/sweep.py, about 6
# minutes): keyed and plain paths at 32, 128, 512 and 1,024 connections over
# HTTP/1.1, over HTTP/2 with TLS (h2load, 4 connections x 8, 32 and 100
# streams), refusals (401, 429) at 512 connections, and the keyed path with
# access logs on; each against an nginx tuned for the load (keepalive 1024,
# http2 on its TLS listener) in the same run, one worker each.
#
#   bench/run.sh --sweep [--duration SECS] [--rounds N] [--refusals-at N] [--keep]
#
# With --keys it measures cold caches and many keys instead (bench/keys.py,
# about a minute): 100,000 distinct keys used once each on a fresh gateway
# (all cache misses on SQLite), then again (all hits); the CPU a miss costs
# and the memory a cached key holds.
#
#   bench/run.sh --keys [--keys-count N] [--keep]
#
# Installs nginx and wrk (and redis-server/redis-tools for --redis) with apt-get
# when they are missing, builds `cargo build --release`, needs python3.
# Takes about 3 minutes (5 with --redis). Best run on an otherwise idle machine;
# the client (wrk) shares the CPUs with the servers, so compare ratios, not
# absolute numbers, across machines.
set -euo pipefail
cd "$(dirname "$0")/.."

want_redis=0
want_valgrind=0
want_sweep=0
want_keys=0
for a in "$@"; do
  case "$a" in
    --redis) want_redis=1 ;;
    --sweep) want_sweep=1 ;;
    --keys) want_keys=1 ;;
    --instructions) want_valgrind=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  esac
done

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if [ $want_sweep = 1 ]; then
  command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
  command -v openssl >/dev/null 2>&1 || need+=(openssl)
fi
if [ $want_valgrind = 1 ]; then
  command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
fi
if [ $want_redis = 1 ]; then
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  # The nginx package starts a system nginx on :80 where an init system runs; we
  # do not need it, but leave it alone: we only use our own instances.
fi
command -v python3 >/dev/null 2>&1 || { echo "python3 is required" >&2; exit 1; }
export PATH="$PATH:/usr/sbin:/sbin"

echo "building: cargo build --release (and the bare hyper proxy, examples/hyper_floor.rs)"
# Whether release builds use the PGO profile (pgo/README.md), by the wrapper's own rules.
pgo/rustc-wrapper --explain "$(command -v rustc)"
cargo build --release
cargo build --release --example hyper_floor
target_dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target_dir/release/portcullis"
[ -x "$bin" ] || { echo "no binary at $bin" >&2; exit 1; }
floor="$target_dir/release/examples/hyper_floor"

# Room for 10,000 client sockets plus the servers' ends (inherited by all of them).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if [ $want_keys = 1 ]; then
  args=()
  for a in "$@"; do [ "$a" = --keys ] || args+=("$a"); done
  exec python3 bench/keys.py --bin "$bin" "${args[@]}"
fi
if [ $want_sweep = 1 ]; then
  args=()
  for a in "$@"; do [ "$a" = --sweep ] || args+=("$a"); done
  exec python3 bench/sweep.py --bin "$bin" "${args[@]}"
fi
exec python3 bench/bench.py --bin "$bin" --floor "$floor" "$@"
