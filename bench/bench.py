#!/usr/bin/env python3
"""portcullis vs nginx proxy_pass, on loopback. Started by bench/run.sh, which
installs the tools, builds the release binary and raises the fd limit.

Throughput: wrk -t1 -c32 against an nginx front (proxy_pass, upstream keepalive
64, one worker) and portcullis (plain route, keyed route, invalid keys; with
its default of one worker per CPU, and again with one worker, like for like
with the nginx front), all in front of the same nginx upstream that answers
200 "ok". A second nginx front with one worker per CPU (`reuseport`) gives
the default-against-default ratios. Rounds alternate between the
targets; the table shows medians. CPU µs per request comes from utime+stime in
/proc/PID/stat of the nginx front's worker and of the portcullis process, so
the upstream's and wrk's CPU are not counted for either (all of a front's
workers are counted when it has several).

The floor (--floor, built by run.sh): examples/hyper_floor.rs, a bare reverse
proxy on the gateway's parts and in its shape (one current-thread worker,
hyper's HTTP/1 server and client connections) doing none of its work. What
portcullis costs above it is the gateway's own; what the floor costs above
nginx is hyper's and tokio's.

Idle connections: N keep-alive connections, each having sent one request and
read its response, held open; RSS growth (VmRSS) per connection.

--redis: the keyed path again with a Redis store in rate_limit.mode hybrid and
redis, with Redis commands per request from INFO commandstats deltas."""
import argparse, hashlib, json, os, re, resource, secrets, shutil, signal, socket
import statistics, subprocess, sys, tempfile, time

TICK = os.sysconf("SC_CLK_TCK")
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
procs = []


def log(msg):
    print(msg, flush=True)


def die(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def stop_all():
    for p in reversed(procs):  # SIGTERM: nginx masters take their workers down
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
    procs.clear()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, proc, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except OSError:
                pass
    return out


# --- processes -----------------------------------------------------------------

def nginx(tmp, name, server_body, upstream_block="", main="", wrap=(), workers=1):
    d = os.path.join(tmp, name)
    os.makedirs(d, exist_ok=True)
    conf = f"""worker_processes {workers}; daemon off; {main} pid {d}/pid; error_log {d}/err warn;
events {{ worker_connections 30000; }}
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; {upstream_block}
  server {{ {server_body} }} }}"""
    with open(f"{d}/nginx.conf", "w") as f:
        f.write(conf)
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    p = subprocess.Popen([*wrap, nginx_bin, "-c", f"{d}/nginx.conf", "-p", d, "-e", f"{d}/err"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(p)
    return p


def gateway(binary, cfg, port, logfile, rust_log="warn"):
    """Starts `portcullis serve` on cfg, output to logfile; RUST_LOG=rust_log
    (None: the config's [log] level decides)."""
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"} | {"PORTCULLIS_CONFIG": cfg}
    if rust_log:
        env["RUST_LOG"] = rust_log
    p = subprocess.Popen([binary, "serve", "--config", cfg], stdout=open(logfile, "w"),
                         stderr=subprocess.STDOUT, env=env)
    procs.append(p)
    if not wait_port(port, p):
        with open(logfile, errors="replace") as f:
            tail = f.read()[-2000:]
        die(f"portcullis did not start ({cfg}):\n{tail}")
    return p


def gateway_config(tmp, name, gw_port, admin_port, up_port, store, mode, workers=None, level="warn",
                   extra=""):
    """A gateway config with a plain and a keyed route; `extra` is appended
    (further tables: `[server.tls]`, `[plans.*]` …)."""
    cfg = os.path.join(tmp, f"{name}.toml")
    workers_line = f"workers = {workers}\n" if workers else ""
    with open(cfg, "w") as f:
        f.write(f"""[server]
listen = "127.0.0.1:{gw_port}"
{workers_line}max_connections = 30000
max_in_flight = 30000
[admin]
listen = "127.0.0.1:{admin_port}"
[store]
url = "{store}"
[rate_limit]
mode = "{mode}"
[plans.default]
limits = [{{ scope = "key", requests = 100000000, per = "1m" }}]
[upstreams.up]
targets = ["http://127.0.0.1:{up_port}"]
[[routes]]
name = "plain"
methods = ["GET"]
path = "/plain"
upstream = "up"
auth = "none"
[[routes]]
name = "keyed"
methods = ["GET"]
path = "/keyed"
upstream = "up"
permissions = ["read"]
[log]
level = "{level}"
{extra}""")
    return cfg


def create_key(binary, cfg):
    r = subprocess.run([binary, "keys", "create", "--workspace", "bench", "--permissions", "read",
                        "--json", "--config", cfg], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PORTCULLIS_CONFIG=cfg))
    if r.returncode != 0:
        die(f"keys create failed: {(r.stderr or r.stdout).strip()[:400]}")
    try:
        rec = json.loads(r.stdout)
        return rec["secret"], rec.get("prefix") or ""
    except Exception:
        die(f"keys create did not print JSON with a secret: {r.stdout[:200]!r}")


def checksum(head):
    """The key checksum (src/keys/format.rs): six base62 digits of the first
    8 bytes of SHA-256(prefix + random part), big-endian."""
    n = int.from_bytes(hashlib.sha256(head.encode()).digest()[:8], "big")
    out = []
    for _ in range(6):
        out.append(BASE62[n % 62])
        n //= 62
    return "".join(reversed(out))


def forged_key(real, prefix):
    """Same prefix and length as `real`, a valid checksum, but unknown to the store."""
    if not prefix or not real.startswith(prefix):
        prefix = real[: real.index("_", real.index("_") + 1) + 1] if real.count("_") >= 2 else real[:8]
    body_len = len(real) - len(prefix) - 6
    head = prefix + "".join(secrets.choice(BASE62) for _ in range(body_len))
    return head + checksum(head)


def mistyped_key(real):
    i = len(real) - 10
    return real[:i] + ("b" if real[i] == "a" else "a") + real[i + 1:]


def read_response(s):
    """Reads one HTTP/1.1 response with a Content-Length body; returns (status, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise OSError("connection closed before a response")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    want = int(m.group(1)) if m else 0
    while len(body) < want:
        chunk = s.recv(4096)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ", 2)[1]), body


def http_get(port, path, headers=None):
    s = socket.create_connection(("127.0.0.1", port), 5)
    req = f"GET {path} HTTP/1.1\r\nHost: bench\r\n"
    for k, v in (headers or {}).items():
        req += f"{k}: {v}\r\n"
    s.sendall((req + "\r\n").encode())
    try:
        return read_response(s)
    finally:
        s.close()


# --- load ----------------------------------------------------------------------

def parse_latency(s):
    m = re.match(r"([\d.]+)(us|ms|s)$", s)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 1.0, "ms": 1e3, "s": 1e6}[m.group(2)]


def wrk(url, pids, duration, headers=(), conns=32):
    """One wrk run; returns dict(rps, n, cpu_us_per_req, p50_us, p99_us, non2xx, errors)."""
    args = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "10s", "--latency"]
    for h in headers:
        args += ["-H", h]
    c0 = sum(cpu_ticks(p) for p in pids)
    out = subprocess.run(args + [url], capture_output=True, text=True).stdout
    c1 = sum(cpu_ticks(p) for p in pids)
    lines = out.splitlines()
    try:
        n = int(next(l.split()[0] for l in lines if "requests in" in l))
        rps = float(next(l.split()[1] for l in lines if l.startswith("Requests/sec")))
    except StopIteration:
        die(f"could not parse wrk output for {url}:\n{out}")
    lat = {}
    for l in lines:
        m = re.match(r"\s+(50|99)(?:\.000)?%\s+(\S+)", l)
        if m:
            lat[m.group(1)] = parse_latency(m.group(2))
    non2xx = sum(int(l.split()[-1]) for l in lines if "Non-2xx" in l)
    errors = 0
    for l in lines:
        if "Socket errors" in l:
            errors = sum(int(x) for x in re.findall(r"\d+", l))
    return {"rps": rps, "n": n, "cpu": (c1 - c0) / TICK * 1e6 / max(n, 1),
            "p50": lat.get("50", float("nan")), "p99": lat.get("99", float("nan")),
            "non2xx": non2xx, "errors": errors}


def median_row(runs):
    return {k: statistics.median(r[k] for r in runs) for k in ("rps", "cpu", "p50", "p99")} | {
        "non2xx": sum(r["non2xx"] for r in runs), "errors": sum(r["errors"] for r in runs),
        "n": sum(r["n"] for r in runs)}


def print_table(rows, title):
    log(f"\n{title}")
    # busy: CPUs the measured process kept busy (CPU/request x req/s). Near 1.0
    # for a one-worker process, it was the bottleneck; well below its worker
    # count, wrk or the scheduler set the pace, not the process.
    log(f"  {'target':<30} {'req/s':>9} {'CPU us/req':>11} {'busy':>5} {'p50 us':>8} {'p99 us':>8} {'non-2xx':>9} {'sock err':>8}")
    for name, r in rows.items():
        log(f"  {name:<30} {r['rps']:>9.0f} {r['cpu']:>11.1f} {r['cpu'] * r['rps'] / 1e6:>5.2f} {r['p50']:>8.0f} "
            f"{r['p99']:>8.0f} {r['non2xx']:>9} {r['errors']:>8}")


def ratio(a, b):
    return a / b if b else float("inf")


# --- idle connections ------------------------------------------------------------

def idle_connections(port, pid, n, path, burst=False):
    """Opens n keep-alive connections, each sending one request; returns
    (KiB/conn, rss before, rss after, connections held). Each response is read
    before the next connection opens, or with `burst` (as
    ../shared/acceptance/perf measures) only after every request was sent, so
    most are in flight at once."""
    before = rss_kib(pid)
    socks = []
    req = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), 10)
            socks.append(s)
            s.sendall(req)
            if not burst:
                read_response(s)
        if burst:
            for s in socks:
                read_response(s)
    except OSError as e:
        log(f"  warning: stopped at {len(socks)} connections: {e}")
    time.sleep(0.5 if burst else 1.0)
    after = rss_kib(pid)
    held = len(socks)
    for s in socks:
        s.close()
    time.sleep(0.5)
    return (after - before) / max(held, 1), before, after, held


# --- redis ---------------------------------------------------------------------------

def redis_calls(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "commandstats"],
                         capture_output=True, text=True).stdout
    calls = {}
    for l in out.splitlines():
        m = re.match(r"cmdstat_([^:]+):calls=(\d+)", l)
        if m:
            calls[m.group(1)] = int(m.group(2))
    return calls


def bench_redis(args, tmp, up_port, nginx_url, nx_worker):
    rport = free_port()
    rdir = os.path.join(tmp, "redis")
    os.makedirs(rdir)
    # appendfsync everysec, as docker-compose.yml runs it.
    rp = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--dir", rdir,
                           "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                           "--maxmemory-policy", "noeviction"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(rp)
    if not wait_port(rport, rp):
        die("redis-server did not start")
    rows, cmds, nginx_runs = {}, {}, []
    # Default workers for both modes, and hybrid again with one worker, like
    # for like with the one-worker nginx front.
    for mode, workers in (("hybrid", None), ("hybrid", 1), ("redis", None)):
        label = f"{mode} mode" + ("" if workers is None else ", 1 worker")
        gw_port, admin_port = free_port(), free_port()
        cfg = gateway_config(tmp, f"redis-{mode}-{workers or 'default'}", gw_port, admin_port, up_port,
                             f"redis://127.0.0.1:{rport}/0", mode, workers=workers)
        key, _ = create_key(args.bin, cfg)
        g = gateway(args.bin, cfg, gw_port, os.path.join(tmp, f"redis-{mode}-{workers or 'default'}.log"))
        st, body = http_get(gw_port, "/keyed", {"Authorization": f"Bearer {key}"})
        if st != 200:
            die(f"redis {label}: GET /keyed with the key answered {st}: {body[:200]!r}")
        url = f"http://127.0.0.1:{gw_port}/keyed"
        hdr = [f"Authorization: Bearer {key}"]
        subprocess.run(["wrk", "-t1", "-c32", "-d1s", "-H", hdr[0], url], capture_output=True)
        runs, per_req, redis_cpu, last_delta, last_n = [], [], [], {}, 1
        for _ in range(args.rounds):
            # nginx in the same rounds: the ratios compare like with like.
            nginx_runs.append(wrk(nginx_url, [nx_worker], args.duration))
            c0, r0 = redis_calls(rport), cpu_ticks(rp.pid)
            r = wrk(url, [g.pid], args.duration, hdr)
            c1, r1 = redis_calls(rport), cpu_ticks(rp.pid)
            delta = {k: v - c0.get(k, 0) for k, v in c1.items() if k != "info" and v - c0.get(k, 0) > 0}
            last_delta, last_n = delta, r["n"]
            per_req.append(sum(delta.values()) / max(r["n"], 1))
            redis_cpu.append((r1 - r0) / TICK * 1e6 / max(r["n"], 1))
            runs.append(r)
        row = median_row(runs)
        rows[f"keyed, {label}"] = row
        # The last round's counts over the last round's requests.
        cmds[label] = (statistics.median(per_req), statistics.median(redis_cpu), last_delta, last_n)
        g.terminate()
        g.wait(15)
    n = median_row(nginx_runs)
    rows = {"nginx proxy_pass (same rounds)": n} | rows
    print_table(rows, f"Redis store (appendfsync everysec), keyed route, medians of {args.rounds} rounds "
                      f"(CPU: nginx front worker / portcullis; redis-server below)")
    for label in cmds:
        r = rows[f"keyed, {label}"]
        log(f"  {label:<21} CPU/request / nginx {ratio(r['cpu'], n['cpu']):5.2f}x   req/s / nginx "
            f"{ratio(r['rps'], n['rps']):5.2f}x" + ("   (acceptance: <= 1.25, >= 0.80)" if label.startswith("hybrid") else ""))
    log("")
    log("  Redis commands per request, from INFO commandstats deltas (INFO itself excluded). Redis also")
    log("  counts the commands a Lua script runs, so a request served by one EVALSHA round trip that runs")
    log("  four commands shows as 5; 'scripts' counts EVAL/EVALSHA/FCALL calls alone.")
    for mode, (per, rcpu, delta, n) in cmds.items():
        scripts = sum(v for k, v in delta.items() if k.split("|")[0] in
                      ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")) / max(n, 1)
        top = ", ".join(f"{k} {v / max(n, 1):.3f}" for k, v in sorted(delta.items(), key=lambda kv: -kv[1])[:8])
        log(f"  {mode:<21} commands/request {per:.3f}   scripts/request {scripts:.3f}   "
            f"redis-server CPU {rcpu:.1f} us/req")
        log(f"          last round, per request: {top or 'none'}")


# --- main ----------------------------------------------------------------------------

def callgrind(tmp, label, start, port, targets):
    """Instructions per request of the process that `start(out_file)` runs
    under callgrind (after a 2 s warm-up, wrk -c8 for 5 s per target)."""
    out = os.path.join(tmp, f"callgrind-{label}.out")
    p = start(out)
    if not wait_port(port, p, timeout=120):
        die(f"{label} under valgrind did not start (run with --keep to see {tmp})")
    for i, (name, path, hdrs) in enumerate(targets, start=1):
        url = f"http://127.0.0.1:{port}{path}"
        wrk_args = ["wrk", "-t1", "-c8"] + [a for h in hdrs for a in ("-H", h)]
        subprocess.run(wrk_args + ["-d2s", url], capture_output=True)
        subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True)
        r = subprocess.run(wrk_args + ["-d5s", url], capture_output=True, text=True).stdout
        n = int(next(l.split()[0] for l in r.splitlines() if "requests in" in l))
        subprocess.run(["callgrind_control", "-d", str(p.pid)], capture_output=True)
        with open(f"{out}.{i}") as f:
            total = next(int(l.split()[1]) for l in f if l.startswith("totals:"))
        log(f"  {name:<32} {total / max(n, 1):>9.0f} instructions/request   ({n} requests)")
    p.terminate()
    p.wait(30)


def instructions(args, tmp, up_port, cfg_store, targets):
    """Instructions per request under callgrind: user-space cost, the same
    from run to run whatever else the machine does (CPU µs are not). One
    worker each: the nginx front, the bare hyper proxy (`examples/
    hyper_floor.rs`, when built) and portcullis. The kernel's share is not
    counted. valgrind does not emulate the SHA extensions, so a SHA-256 (two
    per valid key, one per mistyped key) costs ~3.3k instructions here and
    far less on the CPU."""
    log("\nInstructions per request (callgrind, 1 worker each, user space only; see bench.py)")
    vg = ["valgrind", "--tool=callgrind"]
    port = free_port()

    def front(out):
        return nginx(tmp, "front-callgrind",
                     f"listen 127.0.0.1:{port}; location / {{ proxy_pass http://up; proxy_http_version 1.1; "
                     f"proxy_set_header Connection \"\"; }}",
                     f"upstream up {{ server 127.0.0.1:{up_port}; keepalive 64; }}",
                     main="master_process off;", wrap=(*vg, f"--callgrind-out-file={out}"))
    callgrind(tmp, "nginx", front, port, [("nginx proxy_pass", "/", [])])

    if args.floor:
        fport = free_port()

        def floor(out):
            p = subprocess.Popen([*vg, f"--callgrind-out-file={out}", args.floor,
                                  f"127.0.0.1:{fport}", f"127.0.0.1:{up_port}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            procs.append(p)
            return p
        callgrind(tmp, "floor", floor, fport, [("hyper floor (bare proxy)", "/plain", [])])

    gport = free_port()
    cfg = gateway_config(tmp, "callgrind", gport, free_port(), up_port, cfg_store, "local", workers=1)

    def gateway_vg(out):
        p = subprocess.Popen([*vg, f"--callgrind-out-file={out}", args.bin, "serve", "--config", cfg],
                             stdout=open(os.path.join(tmp, "callgrind.log"), "w"),
                             stderr=subprocess.STDOUT, env=dict(os.environ, RUST_LOG="warn"))
        procs.append(p)
        return p
    callgrind(tmp, "portcullis", gateway_vg, gport, [(f"portcullis {n}", p, h) for n, p, h in targets])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="portcullis binary")
    ap.add_argument("--floor", help="the bare hyper proxy (examples/hyper_floor.rs), measured beside")
    ap.add_argument("--redis", action="store_true", help="also measure hybrid and redis rate-limit modes")
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per target (default 3)")
    ap.add_argument("--conns", type=int, default=10000, help="idle keep-alive connections (default 10000)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--instructions", action="store_true",
                    help="also count instructions per request under callgrind (deterministic; +1 minute)")
    args = ap.parse_args()
    for tool in (("wrk",) + (("redis-server", "redis-cli") if args.redis else ())
                 + (("valgrind", "callgrind_control") if args.instructions else ())):
        if not shutil.which(tool):
            die(f"{tool} is not installed (bench/run.sh installs it)")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    conns = args.conns
    if soft != resource.RLIM_INFINITY and conns > soft - 300:
        conns = max(100, soft - 300)
        log(f"note: fd limit {soft}: measuring {conns} idle connections instead of {args.conns}")

    tmp = tempfile.mkdtemp(prefix="portcullis-bench-")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        run(args, tmp, conns)
    finally:
        stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp, conns):
    version = subprocess.run([args.bin, "--version"], capture_output=True, text=True).stdout.strip()
    log(f"portcullis: {args.bin} ({version or 'version unknown'})")
    log(f"machine: {os.cpu_count()} CPUs, {os.uname().release}; wrk -t1 -c32 -d{args.duration}s, "
        f"{args.rounds} rounds; RUST_LOG=warn")

    up_port, nx_port, gw_port, admin_port = free_port(), free_port(), free_port(), free_port()
    up = nginx(tmp, "upstream", f"listen 127.0.0.1:{up_port}; location / {{ default_type text/plain; return 200 'ok'; }}")
    nx = nginx(tmp, "front",
               f"listen 127.0.0.1:{nx_port}; location / {{ proxy_pass http://up; proxy_http_version 1.1; "
               f"proxy_set_header Connection \"\"; }}",
               f"upstream up {{ server 127.0.0.1:{up_port}; keepalive 64; }}")
    if not (wait_port(up_port, up) and wait_port(nx_port, nx)):
        die(f"nginx did not start; see {tmp}/*/err (run with --keep)")
    time.sleep(0.2)
    workers = children(nx.pid)
    if len(workers) != 1:
        die(f"expected one nginx front worker, found {workers}")
    nx_worker = workers[0]
    # Default against default: nginx with one worker per CPU (its packaged
    # `worker_processes auto`, with `reuseport` as portcullis' workers have),
    # against portcullis' default of one worker per CPU.
    cpus = os.cpu_count() or 1
    nxa_port = free_port()
    nxa = nginx(tmp, "front-auto",
                f"listen 127.0.0.1:{nxa_port} reuseport; location / {{ proxy_pass http://up; "
                f"proxy_http_version 1.1; proxy_set_header Connection \"\"; }}",
                f"upstream up {{ server 127.0.0.1:{up_port}; keepalive 64; }}", workers=cpus)
    if not wait_port(nxa_port, nxa):
        die(f"nginx (one worker per CPU) did not start; see {tmp}/front-auto/err (run with --keep)")
    time.sleep(0.2)
    nxa_workers = children(nxa.pid)
    if len(nxa_workers) != cpus:
        die(f"expected {cpus} nginx workers, found {nxa_workers}")

    cfg = gateway_config(tmp, "gateway", gw_port, admin_port, up_port, f"sqlite://{tmp}/bench.db", "local")
    key, prefix = create_key(args.bin, cfg)
    g = gateway(args.bin, cfg, gw_port, os.path.join(tmp, "gateway.log"))
    forged, typo = forged_key(key, prefix), mistyped_key(key)
    if checksum(key[:-6]) != key[-6:]:
        log("note: the key checksum differs from src/keys/format.rs as bench.py knows it; "
            "the 'forged' key is then refused by its checksum, like the mistyped one")
    for what, path, hdrs, want in (("plain", "/plain", {}, 200),
                                   ("keyed", "/keyed", {"Authorization": f"Bearer {key}"}, 200),
                                   ("forged key", "/keyed", {"Authorization": f"Bearer {forged}"}, 401),
                                   ("mistyped key", "/keyed", {"Authorization": f"Bearer {typo}"}, 401)):
        st, body = http_get(gw_port, path, hdrs)
        if st != want:
            die(f"{what}: GET {path} answered {st} (want {want}): {body[:200]!r}")
    log("sanity: plain 200, keyed 200, forged key 401, mistyped key 401")

    # Like for like: the nginx front has one worker, so a second gateway runs
    # one worker too. The first runs the default, one worker per CPU.
    g1_port = free_port()
    cfg1 = gateway_config(tmp, "one-worker", g1_port, free_port(), up_port,
                          f"sqlite://{tmp}/bench.db", "local", workers=1)
    g1 = gateway(args.bin, cfg1, g1_port, os.path.join(tmp, "one-worker.log"))

    floor = None
    if args.floor:
        fl_port = free_port()
        floor = subprocess.Popen([args.floor, f"127.0.0.1:{fl_port}", f"127.0.0.1:{up_port}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        procs.append(floor)
        if not wait_port(fl_port, floor):
            die("the hyper floor proxy did not start")

    nginx_url, gw = f"http://127.0.0.1:{nx_port}/", f"http://127.0.0.1:{gw_port}"
    gw1 = f"http://127.0.0.1:{g1_port}"
    targets = [
        ("nginx proxy_pass", nginx_url, nx_worker, []),
        (f"nginx, {cpus} workers", f"http://127.0.0.1:{nxa_port}/", nxa_workers, []),
        ("portcullis plain", f"{gw}/plain", g.pid, []),
        ("portcullis keyed", f"{gw}/keyed", g.pid, [f"Authorization: Bearer {key}"]),
        ("portcullis forged key 401", f"{gw}/keyed", g.pid, [f"Authorization: Bearer {forged}"]),
        ("portcullis mistyped key 401", f"{gw}/keyed", g.pid, [f"Authorization: Bearer {typo}"]),
        ("1 worker: plain", f"{gw1}/plain", g1.pid, []),
        ("1 worker: keyed", f"{gw1}/keyed", g1.pid, [f"Authorization: Bearer {key}"]),
        ("1 worker: forged key 401", f"{gw1}/keyed", g1.pid, [f"Authorization: Bearer {forged}"]),
        ("1 worker: mistyped key 401", f"{gw1}/keyed", g1.pid, [f"Authorization: Bearer {typo}"]),
    ]
    if floor:
        targets.append(("hyper floor (bare proxy)", f"http://127.0.0.1:{fl_port}/plain", floor.pid, []))
    log("warm-up…")
    for _, url, _, hdrs in targets:
        a = ["wrk", "-t1", "-c32", "-d1s"]
        for h in hdrs:
            a += ["-H", h]
        subprocess.run(a + [url], capture_output=True)
    runs = {name: [] for name, *_ in targets}
    for i in range(args.rounds):
        log(f"round {i + 1}/{args.rounds}…")
        for name, url, pid, hdrs in targets:
            runs[name].append(wrk(url, pid if isinstance(pid, list) else [pid], args.duration, hdrs))
    rows = {name: median_row(r) for name, r in runs.items()}
    print_table(rows, f"Throughput, medians of {args.rounds} rounds "
                      "(CPU: nginx front worker / portcullis process; upstream and wrk not counted)")
    n, p, k = rows["nginx proxy_pass"], rows["portcullis plain"], rows["portcullis keyed"]
    f, t = rows["portcullis forged key 401"], rows["portcullis mistyped key 401"]
    log("\nRatios")
    log(f"  CPU/request  plain / nginx          {ratio(p['cpu'], n['cpu']):6.2f}x   (acceptance: <= 1.10)")
    log(f"  CPU/request  keyed / nginx          {ratio(k['cpu'], n['cpu']):6.2f}x   (acceptance: <= 1.25)")
    log(f"  req/s        plain / nginx          {ratio(p['rps'], n['rps']):6.2f}x")
    log(f"  req/s        keyed / nginx          {ratio(k['rps'], n['rps']):6.2f}x   (acceptance: >= 0.80)")
    log(f"  req/s        forged-key 401 / keyed {ratio(f['rps'], k['rps']):6.2f}x   (unknown digest: negative cache)")
    log(f"  req/s        mistyped 401 / keyed   {ratio(t['rps'], k['rps']):6.2f}x   (bad checksum: no store lookup)")
    p1, k1 = rows["1 worker: plain"], rows["1 worker: keyed"]
    log(f"  like for like, one worker each (portcullis [server] workers = 1, nginx worker_processes 1):")
    log(f"  CPU/request  plain / nginx          {ratio(p1['cpu'], n['cpu']):6.2f}x")
    log(f"  CPU/request  keyed / nginx          {ratio(k1['cpu'], n['cpu']):6.2f}x")
    log(f"  req/s        keyed / nginx          {ratio(k1['rps'], n['rps']):6.2f}x")
    f1, t1 = rows["1 worker: forged key 401"], rows["1 worker: mistyped key 401"]
    log("  refusals against a saturated gateway: one worker on one CPU, wrk and the upstream on the other")
    log(f"  req/s        forged-key 401 / keyed {ratio(f1['rps'], k1['rps']):6.2f}x   (issue #4: >= 2)")
    log(f"  req/s        mistyped 401 / keyed   {ratio(t1['rps'], k1['rps']):6.2f}x   (issue #4: >= 2)")
    log(f"  CPU/request  keyed / forged, mistyped {ratio(k1['cpu'], f1['cpu']):4.2f}x, {ratio(k1['cpu'], t1['cpu']):.2f}x"
        f"   (default workers: {ratio(k['cpu'], f['cpu']):.2f}x, {ratio(k['cpu'], t['cpu']):.2f}x)")
    na = rows[f"nginx, {cpus} workers"]
    log(f"  default against default, one worker per CPU each (nginx worker_processes {cpus}, reuseport):")
    log(f"  CPU/request  plain / nginx          {ratio(p['cpu'], na['cpu']):6.2f}x")
    log(f"  CPU/request  keyed / nginx          {ratio(k['cpu'], na['cpu']):6.2f}x")
    log(f"  req/s        keyed / nginx          {ratio(k['rps'], na['rps']):6.2f}x")
    log(f"  CPU/request  nginx {cpus} workers / 1   {ratio(na['cpu'], n['cpu']):6.2f}x")
    if floor:
        fl = rows["hyper floor (bare proxy)"]
        log("  the floor: hyper + tokio in the gateway's shape, none of its work (examples/hyper_floor.rs):")
        log(f"  CPU/request  floor / nginx          {ratio(fl['cpu'], n['cpu']):6.2f}x")
        log(f"  CPU/request  1-worker plain / floor {ratio(p1['cpu'], fl['cpu']):6.2f}x")
        log(f"  CPU/request  1-worker keyed / floor {ratio(k1['cpu'], fl['cpu']):6.2f}x")
    g1.terminate()
    g1.wait(15)
    bad = n["non2xx"] + na["non2xx"] + p["non2xx"] + k["non2xx"] + p1["non2xx"] + k1["non2xx"]
    if bad:
        log(f"  WARNING: {bad} non-2xx answers on the nginx/plain/keyed runs")

    log(f"\nIdle keep-alive connections ({conns}, each after one request/response)")
    per, b, a, held = idle_connections(gw_port, g.pid, conns, "/plain")
    log(f"  portcullis  {per:6.2f} KiB/conn   RSS {b} -> {a} KiB over {held} connections   (acceptance: <= 4 KiB)")
    per_n, b, a, held = idle_connections(nx_port, nx_worker, conns, "/")
    log(f"  nginx       {per_n:6.2f} KiB/conn   RSS {b} -> {a} KiB over {held} connections (front worker)")

    # The acceptance check's way: a fresh gateway, warmed by wrk, then a burst.
    burst = min(4000, conns)
    log(f"\nBurst of {burst} connections (all requests sent before any answer is read, as the acceptance check does)")
    g2_port = free_port()
    cfg2 = gateway_config(tmp, "burst", g2_port, free_port(), up_port, f"sqlite://{tmp}/bench.db", "local")
    g2 = gateway(args.bin, cfg2, g2_port, os.path.join(tmp, "burst.log"))
    wrk(f"http://127.0.0.1:{g2_port}/plain", [g2.pid], 2)
    per_b, b, a, held = idle_connections(g2_port, g2.pid, burst, "/plain", burst=True)
    log(f"  portcullis  {per_b:6.2f} KiB/conn   RSS {b} -> {a} KiB over {held} connections   (peak of the burst; see README)")
    g2.terminate()
    g2.wait(15)

    if args.instructions:
        if floor:
            floor.terminate()
            floor.wait(15)
        instructions(args, tmp, up_port, f"sqlite://{tmp}/bench.db", [
            ("plain", "/plain", []),
            ("keyed", "/keyed", [f"Authorization: Bearer {key}"]),
            ("forged key 401", "/keyed", [f"Authorization: Bearer {forged}"]),
            ("mistyped key 401", "/keyed", [f"Authorization: Bearer {typo}"]),
        ])

    if args.redis:
        g.terminate()
        g.wait(15)
        bench_redis(args, tmp, up_port, nginx_url, nx_worker)


if __name__ == "__main__":
    main()
