#!/usr/bin/env python3
"""Cold caches and many keys: what a key-cache miss costs and what a cached
key holds in memory. Started by `bench/run.sh --keys`.

N distinct active keys (default 100,000, ~300-byte records like a real
key's: a name, three permissions, a plan, a little metadata) are written
straight into a SQLite key store in the gateway's layout, then a fresh
gateway (default config, SQLite store, `rate_limit.mode = "local"`) is
loaded by wrk -t1 -c32, each request with the next key of the list:

- the cold pass uses every key once: every request is a cache miss (a store
  lookup), as after a restart;
- the warm pass uses every key once more: every request is a hit;
- then timed runs of hits only, each request's key drawn from the first K
  keys (K = 1, 10,000 and N), uniformly or Zipf-like (rank = K^u for a
  uniform u: a few keys carry most requests, as real API traffic does).

Miss cost = CPU per request of the cold pass minus that of the warm pass;
memory per cached key = RSS growth over the cold pass (all N keys cached,
with their rate-limit windows and last-used marks) divided by N."""
import argparse, hashlib, json, os, secrets, shutil, signal, sqlite3, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (BASE62, TICK, checksum, cpu_ticks, die, free_port, gateway, gateway_config,  # noqa: E402
                   http_get, log, nginx, rss_kib, stop_all, wait_port)

LUA = """
local keys = {{}}
for line in io.lines("{keys}") do keys[#keys + 1] = line end
local n, i, done = #keys, 0, 0
request = function()
  -- Past the list (requests still in flight when the pass ends): from the top.
  i = i % n + 1
  return wrk.format("GET", "/keyed", {{ ["Authorization"] = "Bearer " .. keys[i] }})
end
response = function(status)
  done = done + 1
  if done == n then
    -- wrk runs out its duration even with its thread stopped: tell the
    -- harness, which interrupts it.
    local f = io.open("{marker}", "w")
    f:write(done)
    f:close()
    wrk.thread:stop()
  end
end
"""


# Keys for the warm-up pass (not measured).
SPARE = 5_000

PICK = """
local keys = {{}}
for line in io.lines("{keys}") do
  keys[#keys + 1] = line
  if #keys == {k} then break end
end
local k = #keys
request = function()
  local i
  if {zipf} then i = math.floor(k ^ math.random()) else i = math.random(k) end
  if i < 1 then i = 1 elseif i > k then i = k end
  return wrk.format("GET", "/keyed", {{ ["Authorization"] = "Bearer " .. keys[i] }})
end
"""


def timed(url, pid, lua, duration):
    c0 = cpu_ticks(pid)
    out = subprocess.run(["wrk", "-t1", "-c32", f"-d{duration}s", "--timeout", "10s", "-s", lua, url],
                         capture_output=True, text=True).stdout
    c1 = cpu_ticks(pid)
    lines = out.splitlines()
    n = int(next(l.split()[0] for l in lines if "requests in" in l))
    rps = float(next(l.split()[1] for l in lines if l.startswith("Requests/sec")))
    non2xx = sum(int(l.split()[-1]) for l in lines if "Non-2xx" in l)
    return {"n": n, "cpu": (c1 - c0) / TICK * 1e6 / max(n, 1), "rps": rps, "non2xx": non2xx}


def config(tmp, port, up_port, db):
    """bench.py's gateway config (default workers) on the SQLite file `db`,
    with the plan the written keys name."""
    return gateway_config(tmp, "keys", port, free_port(), up_port, f"sqlite://{db}", "local",
                          extra='[plans.pro]\nlimits = [{ scope = "key", requests = 100000000, per = "1m" }]\n')


def fill(binary, cfg, db, n, keys_file, spare_file, spare):
    """Creates one key with the CLI (schema, prefix), then n + spare more
    like it straight into the tables; writes the secrets of n of them to
    keys_file and of the others to spare_file."""
    r = subprocess.run([binary, "keys", "create", "--workspace", "bench", "--permissions", "read",
                        "--json", "--config", cfg], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        die(f"keys create failed: {(r.stderr or r.stdout).strip()[:400]}")
    first = json.loads(r.stdout)
    prefix, body_len = first["prefix"], len(first["secret"]) - len(first["prefix"]) - 6
    c = sqlite3.connect(db)
    (template,) = c.execute("SELECT record FROM keys WHERE id = ?", (first["id"],)).fetchone()
    template = json.loads(template)
    rows, digests, out = [], [], []
    for i in range(n + spare):
        head = prefix + "".join(secrets.choice(BASE62) for _ in range(body_len))
        secret = head + checksum(head)
        kid = "key_" + "".join(secrets.choice(BASE62) for _ in range(20))
        rec = dict(template, id=kid, name=f"billing service {i}", last4=secret[-4:], plan="pro",
                   permissions=["read", "sms.send", "sms.read"],
                   metadata={"team": "billing", "owner": f"svc-{i % 97}@example.com"})
        rows.append((kid, "bench", json.dumps(rec, separators=(",", ":"))))
        digests.append((hashlib.sha256(secret.encode()).digest(), kid))
        out.append(secret)
    with c:
        c.executemany("INSERT INTO keys (id, workspace, record) VALUES (?, ?, ?)", rows)
        c.executemany("INSERT INTO digests (digest, key_id, expires_at) VALUES (?, ?, NULL)", digests)
    c.close()
    with open(keys_file, "w") as f:
        f.write("\n".join(out[:n]) + "\n")
    with open(spare_file, "w") as f:
        f.write("\n".join(out[n:]) + "\n")
    return sum(len(r[2]) for r in rows) / len(rows)


def one_pass(url, pid, lua, marker):
    """One request per key; returns when the last answer is in."""
    if os.path.exists(marker):
        os.unlink(marker)
    c0, t0 = cpu_ticks(pid), time.time()
    w = subprocess.Popen(["wrk", "-t1", "-c32", "-d600s", "--timeout", "10s", "-s", lua, url],
                         stdout=subprocess.PIPE, text=True)
    while not os.path.exists(marker):
        if w.poll() is not None:
            die("wrk ended before the pass did")
        time.sleep(0.01)
    c1, secs = cpu_ticks(pid), time.time() - t0
    w.send_signal(signal.SIGINT)
    out = w.communicate(timeout=30)[0]
    lines = out.splitlines()
    done = int(open(marker).read())
    non2xx = sum(int(l.split()[-1]) for l in lines if "Non-2xx" in l)
    return {"n": done, "cpu": (c1 - c0) / TICK * 1e6 / max(done, 1), "rps": done / secs, "non2xx": non2xx}


def run(args, tmp):
    up_port, gw_port = free_port(), free_port()
    up = nginx(tmp, "upstream", f"listen 127.0.0.1:{up_port}; location / {{ default_type text/plain; return 200 'ok'; }}")
    if not wait_port(up_port, up):
        die("upstream nginx did not start")
    db = os.path.join(tmp, "keys.db")
    cfg = config(tmp, gw_port, up_port, db)
    keys_file, spare_file = os.path.join(tmp, "secrets.txt"), os.path.join(tmp, "spare.txt")
    log(f"writing {args.keys} keys (and {SPARE} for the warm-up) into {db}…")
    size = fill(args.bin, cfg, db, args.keys, keys_file, spare_file, SPARE)
    lua, marker = os.path.join(tmp, "keys.lua"), os.path.join(tmp, "pass-done")
    with open(lua, "w") as f:
        f.write(LUA.format(keys=keys_file, marker=marker))
    spare_lua = os.path.join(tmp, "spare.lua")
    with open(spare_lua, "w") as f:
        f.write(LUA.format(keys=spare_file, marker=marker))
    g = gateway(args.bin, cfg, gw_port, os.path.join(tmp, "gateway.log"))
    with open(keys_file) as f:
        probe = f.readline().strip()
    st, body = http_get(gw_port, "/keyed", {"Authorization": f"Bearer {probe}"})
    if st != 200:
        die(f"a written key answered {st}: {body[:200]!r}")
    url = f"http://127.0.0.1:{gw_port}/keyed"
    # A cold pass over other keys first: the blocking pool's threads, the
    # store's connections and caches and the client connections exist
    # before the measured pass, so its RSS growth is the cached keys'.
    one_pass(url, g.pid, spare_lua, marker)
    time.sleep(1)
    before = rss_kib(g.pid)
    cold = one_pass(url, g.pid, lua, marker)
    time.sleep(1)
    after = rss_kib(g.pid)
    warm = one_pass(url, g.pid, lua, marker)
    hits = []
    for k in sorted({1, min(10_000, args.keys), args.keys}):
        for zipf in ((False,) if k == 1 else (False, True)):
            pick = os.path.join(tmp, f"pick-{k}-{zipf}.lua")
            with open(pick, "w") as f:
                f.write(PICK.format(keys=keys_file, k=k, zipf="true" if zipf else "false"))
            label = f"hits over {k} key{'s' if k > 1 else ''}" + (", Zipf" if zipf else (", uniform" if k > 1 else ""))
            hits.append((label, timed(url, g.pid, pick, args.duration)))
    log(f"\n{args.keys} keys, records of {size:.0f} bytes (JSON) on average; wrk -t1 -c32, one request per key")
    for name, r in (("cold pass (all misses)", cold), ("warm pass (all hits)", warm)):
        log(f"  {name:<32} {r['rps']:>9.0f} req/s  {r['cpu']:>6.1f} us CPU/request  non-2xx {r['non2xx']}")
    for name, r in hits:
        log(f"  {name:<32} {r['rps']:>9.0f} req/s  {r['cpu']:>6.1f} us CPU/request  non-2xx {r['non2xx']}")
    log(f"  miss cost                        {cold['cpu'] - warm['cpu']:6.1f} us CPU (cold minus warm; bar <= 40)")
    log(f"  cold / warm req/s                {cold['rps'] / warm['rps']:6.2f}x")
    log(f"  memory per cached key            {(after - before) * 1024 / args.keys:6.0f} B "
        f"(RSS {before} -> {after} KiB; bar <= 600)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="portcullis binary")
    ap.add_argument("--keys-count", dest="keys", type=int, default=100_000,
                    help="distinct keys (default 100000)")
    ap.add_argument("--duration", type=int, default=4, help="seconds per timed run of hits (default 4)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args, _ = ap.parse_known_args()
    if not shutil.which("wrk"):
        die("wrk is not installed (bench/run.sh installs it)")
    tmp = tempfile.mkdtemp(prefix="portcullis-keys-")
    try:
        run(args, tmp)
    finally:
        stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
