#!/usr/bin/env bash
# Container smoke test: build the image, run it with --network host, wait for
# http://127.0.0.1:9901/healthz, check that it runs as non-root and declares a
# HEALTHCHECK; then run it again with a keyed route in front of the image's own
# example upstream, create a key with `portcullis keys create` in the image, and
# check a keyed request is proxied (200) and a keyless one refused (401).
# Exits non-zero on any failure.
#
#   scripts/container-smoke.sh
#
# Environment:
#   PODMAN          container CLI (default ../shared/container/podman when it
#                   exists, else podman, else docker)
#   PREPARE_IMAGES  script that makes the base images available offline, run
#                   first when set or when ../shared/container/prepare-images.sh
#                   exists; PREPARE_IMAGES= (empty) skips it
#   IMAGE           image tag (default portcullis)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[container-smoke] %s\n' "$*"; }
die() { printf '[container-smoke] FAIL: %s\n' "$*" >&2; exit 1; }

if [ -z "${PODMAN:-}" ]; then
  if [ -x ../shared/container/podman ]; then PODMAN=../shared/container/podman
  elif command -v podman >/dev/null 2>&1; then PODMAN=podman
  elif command -v docker >/dev/null 2>&1; then PODMAN=docker
  else die "no container CLI: set PODMAN"; fi
fi
IMAGE=${IMAGE:-portcullis}
HEALTH_URL=http://127.0.0.1:9901/healthz

if [ -z "${PREPARE_IMAGES+set}" ] && [ -f ../shared/container/prepare-images.sh ]; then
  PREPARE_IMAGES=../shared/container/prepare-images.sh
fi
if [ -n "${PREPARE_IMAGES:-}" ]; then
  log "preparing base images: $PREPARE_IMAGES (log: /tmp/container-smoke-prepare.log)"
  bash "$PREPARE_IMAGES" >/tmp/container-smoke-prepare.log 2>&1 \
    || { tail -20 /tmp/container-smoke-prepare.log >&2; die "base images could not be prepared"; }
fi

log "building with $PODMAN (log: /tmp/container-smoke-build.log)"
if ! "$PODMAN" build -t "$IMAGE" . >/tmp/container-smoke-build.log 2>&1; then
  tail -30 /tmp/container-smoke-build.log >&2
  die "image build failed"
fi

user=$("$PODMAN" image inspect --format '{{.Config.User}}' "$IMAGE")
healthcheck=$("$PODMAN" image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")
size=$("$PODMAN" image inspect --format '{{.Size}}' "$IMAGE")

# With --network host the container shares the host's ports: something else
# answering on them would make the checks pass falsely.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port_busy 9901 && die "port 9901 is already in use on this host; stop whatever listens there first"
public_free=1
port_busy 8080 && { public_free=0; log "note: port 8080 is in use on this host; skipping the public listener check"; }

cid=$("$PODMAN" run -d --rm --network host "$IMAGE")
stopped=0
cleanup() {
  [ $stopped = 1 ] && return 0
  stopped=1
  "$PODMAN" logs "$cid" >/tmp/container-smoke-run.log 2>&1 || true
  "$PODMAN" stop -t 10 "$cid" >/dev/null 2>&1 || true
}
trap cleanup EXIT
log "started container ${cid:0:12}; waiting for $HEALTH_URL"

running() { [ "$("$PODMAN" inspect --format '{{.State.Running}}' "$cid" 2>/dev/null)" = "true" ]; }
healthy=0
for _ in $(seq 1 60); do
  if curl -fsS -o /dev/null --max-time 2 "$HEALTH_URL" 2>/dev/null; then healthy=1; break; fi
  running || break
  sleep 0.5
done

fails=()
if [ $healthy = 1 ]; then
  sleep 1
  running || fails+=("the container exited after answering /healthz (see /tmp/container-smoke-run.log)")
fi
case "$user" in
  ""|root|0|0:*|root:*) fails+=("image runs as root (User=${user:-<unset>})") ;;
esac
[ -n "$healthcheck" ] && [ "$healthcheck" != "null" ] && [ "$healthcheck" != "{}" ] \
  || fails+=("image has no HEALTHCHECK")
[ $healthy = 1 ] || fails+=("no answer from $HEALTH_URL")

# The public listener answers too: 404 NOT_FOUND JSON for a path with no route.
if [ $public_free = 1 ]; then
  public=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://127.0.0.1:8080/no-such-route || true)
  log "public listener: GET /no-such-route -> HTTP ${public:-none}"
  [ "$public" = 404 ] || fails+=("public listener on :8080 answered ${public:-nothing} to GET /no-such-route (want 404)")
fi

cleanup
trap - EXIT

# A keyed request through the container: the image's example upstream on
# 127.0.0.1:7001, a config with one keyed route, a key made by the image's CLI
# on a volume the gateway then serves from.
if [ $public_free = 1 ] && ! port_busy 7001 && [ $healthy = 1 ]; then
  work=$(mktemp -d)
  cat >"$work/keyed.toml" <<'TOML'
[server]
listen = "0.0.0.0:8080"
[admin]
listen = "127.0.0.1:9901"
[store]
url = "sqlite:///var/lib/portcullis/portcullis.db"
[upstreams.sms]
targets = ["http://127.0.0.1:7001"]
[[routes]]
name = "sms.send"
methods = ["POST"]
path = "/v1/sms/send"
upstream = "sms"
permissions = ["sms.send"]
TOML
  chmod 755 "$work"; chmod 644 "$work/keyed.toml"
  vol="portcullis-smoke-$$"
  "$PODMAN" volume create "$vol" >/dev/null
  mounts=(-v "$work/keyed.toml:/etc/portcullis/portcullis.toml:ro" -v "$vol:/var/lib/portcullis")
  up=$("$PODMAN" run -d --rm --network host --entrypoint portcullis "$IMAGE" example-upstream --listen 127.0.0.1:7001 --name sms 2>/dev/null)
  key=$("$PODMAN" run --rm --network host "${mounts[@]}" "$IMAGE" keys create --workspace smoke --permissions sms.send --json 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])' || true)
  gw=$("$PODMAN" run -d --rm --network host "${mounts[@]}" "$IMAGE" 2>/dev/null)
  for _ in $(seq 1 60); do curl -fsS -o /dev/null --max-time 2 "$HEALTH_URL" 2>/dev/null && break; sleep 0.5; done
  keyed=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X POST http://127.0.0.1:8080/v1/sms/send \
          -H "Authorization: Bearer $key" -H 'Content-Type: application/json' -d '{"to":"+15551234567"}' || true)
  keyless=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X POST http://127.0.0.1:8080/v1/sms/send || true)
  log "keyed route: with a key -> HTTP ${keyed:-none}, without -> HTTP ${keyless:-none}"
  [ "$keyed" = 200 ] || fails+=("a keyed request through the container answered ${keyed:-nothing} (want 200)")
  [ "$keyless" = 401 ] || fails+=("a keyless request answered ${keyless:-nothing} (want 401)")
  "$PODMAN" stop -t 5 "$gw" "$up" >/dev/null 2>&1 || true
  "$PODMAN" volume rm -f "$vol" >/dev/null 2>&1 || true
  rm -rf "$work"
else
  log "note: ports 8080/7001 busy or the first run failed; skipping the keyed-request check"
fi

if [ ${#fails[@]} -gt 0 ]; then
  log "container log (tail):"; tail -20 /tmp/container-smoke-run.log >&2 || true
  for f in "${fails[@]}"; do printf '[container-smoke] FAIL: %s\n' "$f" >&2; done
  exit 1
fi
log "OK: runs as user $user, healthcheck $healthcheck, image $((size / 1000000)) MB"
