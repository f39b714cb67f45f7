#!/usr/bin/env python3
"""The cost curve as load grows: portcullis against nginx tuned for the same
load, in the same run, both with one worker (nginx `worker_processes 1`,
portcullis `[server] workers = 1`; bench.py's config, whose connection
limits are raised to 30,000, every other setting its default). Started by
`bench/run.sh --sweep`, which installs the tools and builds the release
binary.

- HTTP/1.1 (wrk -t1): 32, 128, 512 and 1,024 client connections; nginx with
  upstream `keepalive 1024`. Rows: nginx, portcullis plain, keyed; at the
  refusal point (512 by default) also a forged key (401 from the negative
  cache) and a key over its rate limit (429).
- HTTP/2 over TLS (h2load -t1 -c4): 8, 32 and 100 streams per connection;
  nginx `listen … ssl http2`, portcullis `[server.tls]`, same certificate.
- Access logs on: the keyed path at 32 connections with portcullis at its
  default `info` level (one access line per request, to a file) against
  nginx with `access_log … buffer=64k` of the same fields.

CPU µs per request is utime+stime of the nginx front worker and of the
portcullis process over each run (/proc/PID/stat); the upstream (one nginx
worker answering 200 "ok") and the load tool are not counted. Rounds
alternate between targets; tables show medians and ratios to nginx."""
import argparse, os, re, shutil, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from bench import (TICK, children, cpu_ticks, die, forged_key, free_port, gateway,  # noqa: E402
                   gateway_config, http_get, log, nginx, stop_all, wait_port)

H1_CONNS = (32, 128, 512, 1024)
H2_STREAMS = (8, 32, 100)
H2_CONNS = 4
BAR = 1.15


def config(tmp, name, port, up_port, tls=None, level="warn"):
    """bench.py's gateway config with one worker, optionally TLS, and a plan
    whose limit a second key exhausts at once (for the 429 row)."""
    tls_block = f'[server.tls]\ncert = "{tls[0]}"\nkey = "{tls[1]}"\n' if tls else ""
    return gateway_config(tmp, name, port, free_port(), up_port, f"sqlite://{tmp}/sweep.db", "local",
                          workers=1, level=level,
                          extra=tls_block + '[plans.tiny]\nlimits = [{ scope = "key", requests = 1, per = "1h" }]\n')


def key(binary, cfg, *extra):
    r = subprocess.run([binary, "keys", "create", "--workspace", "bench", "--permissions", "read",
                        "--json", "--config", cfg, *extra], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        die(f"keys create failed: {(r.stderr or r.stdout).strip()[:400]}")
    import json
    return json.loads(r.stdout)["secret"]


def wrk(url, pids, conns, duration, headers=()):
    return bench.wrk(url, pids, duration, headers, conns=conns)


def h2load(url, pids, streams, duration, headers=()):
    args = ["h2load", "-t1", f"-c{H2_CONNS}", f"-m{streams}", "-D", str(duration), "--warm-up-time", "1"]
    for h in headers:
        args += ["-H", h]
    c0 = sum(cpu_ticks(p) for p in pids)
    out = subprocess.run(args + [url], capture_output=True, text=True).stdout
    c1 = sum(cpu_ticks(p) for p in pids)
    # The warm-up second is excluded from h2load's counts but not from the
    # CPU delta: scale the CPU by the measured share of the run.
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    r = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
    s = re.search(r"status codes: (\d+) 2xx", out)
    if not (m and r and s):
        die(f"could not parse h2load output for {url}:\n{out}")
    secs = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    n, rps = int(r.group(2)), float(m.group(3))
    cpu = (c1 - c0) / TICK * 1e6 * (secs / (secs + 1.0)) / max(n, 1)
    return {"rps": rps, "n": n, "cpu": cpu, "non2xx": n - int(s.group(1)), "errors": n - int(r.group(3))}


def med(runs):
    return {"rps": statistics.median(r["rps"] for r in runs), "cpu": statistics.median(r["cpu"] for r in runs),
            "non2xx": sum(r["non2xx"] for r in runs), "errors": sum(r["errors"] for r in runs)}


def table(title, points, rows, expected_non2xx=()):
    """rows: {point: {name: med}}; the first name is nginx, the reference."""
    log(f"\n{title}")
    names = list(next(iter(rows.values())).keys())
    log(f"  {'load':<12}" + "".join(f"{n:>26}" for n in names))
    worst = 0.0
    for p in points:
        r = rows[p]
        ref = r[names[0]]
        cells = []
        for n in names:
            x = r[n]
            c = x["cpu"] / ref["cpu"] if ref["cpu"] else float("inf")
            bad = "" if (x["non2xx"] == 0 or n in expected_non2xx) and x["errors"] == 0 else " !"
            cells.append(f"{x['cpu']:6.1f}us {c:4.2f}x {x['rps'] / ref['rps']:4.2f}r{bad}")
            if n.startswith("keyed"):
                worst = max(worst, c)
        log(f"  {p:<12}" + "".join(f"{c:>26}" for c in cells))
    log("  (each cell: CPU us/request, CPU ratio to nginx, req/s ratio to nginx; ! = non-2xx or socket errors)")
    return worst


def certs(tmp):
    cert, keyf = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", keyf, "-out", cert],
                   check=True, capture_output=True)
    return cert, keyf


def front(tmp, name, port, up_port, listen_extra="", server_extra="", http_extra=""):
    """An nginx front (one worker) on the shared upstream, keepalive 1024;
    `server_extra` goes into its server block, `http_extra` into http."""
    p = nginx(tmp, name,
              f"listen 127.0.0.1:{port}{listen_extra}; {server_extra} location / {{ proxy_pass http://up; "
              f"proxy_http_version 1.1; proxy_set_header Connection \"\"; }}",
              f"upstream up {{ server 127.0.0.1:{up_port}; keepalive 1024; }} {http_extra}")
    if not wait_port(port, p):
        die(f"nginx {name} did not start; see {tmp}/{name}/err (run with --keep)")
    time.sleep(0.2)
    w = children(p.pid)
    if len(w) != 1:
        die(f"expected one nginx worker for {name}, found {w}")
    return w[0]


def run(args, tmp):
    cpus = os.cpu_count() or 1
    log(f"machine: {cpus} CPUs, {os.uname().release}; {args.rounds} rounds of {args.duration} s per point")
    up_port = free_port()
    up = nginx(tmp, "upstream", f"listen 127.0.0.1:{up_port}; location / {{ default_type text/plain; return 200 'ok'; }}")
    if not wait_port(up_port, up):
        die("upstream nginx did not start")
    cert, keyf = certs(tmp)

    # HTTP/1.1
    nx_port, gw_port = free_port(), free_port()
    nx = front(tmp, "front", nx_port, up_port)
    cfg = config(tmp, "h1", gw_port, up_port)
    good, tiny = key(args.bin, cfg), key(args.bin, cfg, "--plan", "tiny")
    forged = forged_key(good, "")
    g = gateway(args.bin, cfg, gw_port, os.path.join(tmp, "h1.log"))
    gw = f"http://127.0.0.1:{gw_port}"
    for what, hdrs, want in (("keyed", {"Authorization": f"Bearer {good}"}, 200),
                             ("forged", {"Authorization": f"Bearer {forged}"}, 401),
                             ("over limit", {"Authorization": f"Bearer {tiny}"}, 200),
                             ("over limit", {"Authorization": f"Bearer {tiny}"}, 429)):
        st, body = http_get(gw_port, "/keyed", hdrs)
        if st != want:
            die(f"{what}: answered {st}, want {want}: {body[:200]!r}")
    h1 = {}
    for conns in H1_CONNS:
        targets = [("nginx (keepalive 1024)", f"http://127.0.0.1:{nx_port}/", nx, []),
                   ("plain", f"{gw}/plain", g.pid, []),
                   ("keyed", f"{gw}/keyed", g.pid, [f"Authorization: Bearer {good}"])]
        if conns == args.refusals_at:
            targets += [("forged key 401", f"{gw}/keyed", g.pid, [f"Authorization: Bearer {forged}"]),
                        ("over limit 429", f"{gw}/keyed", g.pid, [f"Authorization: Bearer {tiny}"])]
        for _, url, pid, hdrs in targets:  # warm-up, and pools grown to this load
            wrk(url, [pid], conns, 1, hdrs)
        runs = {n: [] for n, *_ in targets}
        for _ in range(args.rounds):
            for n, url, pid, hdrs in targets:
                runs[n].append(wrk(url, [pid], conns, args.duration, hdrs))
        h1[f"{conns} conns"] = {n: med(r) for n, r in runs.items()}
        log(f"  HTTP/1.1 at {conns} connections done")
    points = [f"{c} conns" for c in H1_CONNS]
    worst_h1 = table("HTTP/1.1, wrk -t1, one worker each", points,
                     {p: {n: v for n, v in h1[p].items() if "401" not in n and "429" not in n} for p in points})
    at = h1.get(f"{args.refusals_at} conns", {})
    if "forged key 401" in at:
        k = at["keyed"]["cpu"]
        log(f"\nRefusals at {args.refusals_at} connections, CPU per request against a forwarded keyed request:")
        log(f"  forged key 401   {at['forged key 401']['cpu'] / k:4.2f}x   over limit 429   "
            f"{at['over limit 429']['cpu'] / k:4.2f}x   (bar: <= 0.5)")
    g.terminate()
    g.wait(15)

    # HTTP/2 over TLS
    nx2_port, gw2_port = free_port(), free_port()
    nx2 = front(tmp, "front-h2", nx2_port, up_port, listen_extra=" ssl http2",
                server_extra=f"ssl_certificate {cert}; ssl_certificate_key {keyf}; http2_max_concurrent_streams 128;")
    cfg2 = config(tmp, "h2", gw2_port, up_port, tls=(cert, keyf))
    g2 = gateway(args.bin, cfg2, gw2_port, os.path.join(tmp, "h2.log"))
    h2 = {}
    for streams in H2_STREAMS:
        targets = [("nginx h2 (keepalive 1024)", f"https://127.0.0.1:{nx2_port}/", nx2, []),
                   ("plain", f"https://127.0.0.1:{gw2_port}/plain", g2.pid, []),
                   ("keyed", f"https://127.0.0.1:{gw2_port}/keyed", g2.pid, [f"authorization: Bearer {good}"])]
        runs = {n: [] for n, *_ in targets}
        for _ in range(args.rounds):
            for n, url, pid, hdrs in targets:
                runs[n].append(h2load(url, [pid], streams, args.duration, hdrs))
        h2[f"{H2_CONNS}x{streams} streams"] = {n: med(r) for n, r in runs.items()}
        log(f"  h2 at {streams} streams done")
    points2 = [f"{H2_CONNS}x{s} streams" for s in H2_STREAMS]
    worst_h2 = table(f"HTTP/2 over TLS, h2load -t1 -c{H2_CONNS}, one worker each", points2, h2)
    rps_h2 = min(h2[p]["keyed"]["rps"] / h2[p]["nginx h2 (keepalive 1024)"]["rps"] for p in points2)
    g2.terminate()
    g2.wait(15)

    # Access logs on, both sides.
    nx3_port, gw3_port = free_port(), free_port()
    # Roughly the fields of portcullis' access line.
    nx3 = front(tmp, "front-log", nx3_port, up_port,
                http_extra=("log_format gw '$time_iso8601 INFO portcullis::access: $request_id "
                            "method=$request_method path=$uri route=keyed status=$status "
                            "bytes=$body_bytes_sent duration_ms=$request_time upstream=$upstream_addr "
                            "client=$remote_addr';"),
                server_extra=f"access_log {tmp}/nginx-access.log gw buffer=64k;")
    cfg3 = config(tmp, "logged", gw3_port, up_port, level="info")
    g3 = gateway(args.bin, cfg3, gw3_port, os.path.join(tmp, "logged.log"), rust_log=None)
    targets = [("nginx, access_log buffer=64k", f"http://127.0.0.1:{nx3_port}/", nx3, []),
               ("keyed, access log (info)", f"http://127.0.0.1:{gw3_port}/keyed", g3.pid,
                [f"Authorization: Bearer {good}"])]
    runs = {n: [] for n, *_ in targets}
    for _, url, pid, hdrs in targets:
        wrk(url, [pid], 32, 1, hdrs)
    for _ in range(args.rounds):
        for n, url, pid, hdrs in targets:
            runs[n].append(wrk(url, [pid], 32, args.duration, hdrs))
    logged = {"32 conns": {n: med(r) for n, r in runs.items()}}
    worst_log = table("Access logs on, wrk -t1 -c32, one worker each (lines to a file)", ["32 conns"], logged)
    lines = sum(1 for _ in open(os.path.join(tmp, "logged.log"), errors="replace"))
    log(f"  portcullis wrote {lines} log lines")

    log("\nSummary (bars: keyed CPU/request <= 1.15x nginx at every point; h2 req/s >= 0.9x)")
    log(f"  HTTP/1.1 keyed, worst point   {worst_h1:4.2f}x")
    log(f"  h2 keyed, worst point         {worst_h2:4.2f}x   req/s, worst point {rps_h2:4.2f}x")
    log(f"  keyed with access logs        {worst_log:4.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="portcullis binary")
    ap.add_argument("--duration", type=int, default=4, help="seconds per run (default 4)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per point (default 3)")
    ap.add_argument("--refusals-at", type=int, default=512, help="connections for the refusal rows")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args, _ = ap.parse_known_args()
    for tool in ("wrk", "h2load", "openssl"):
        if not shutil.which(tool):
            die(f"{tool} is not installed (bench/run.sh --sweep installs it)")
    tmp = tempfile.mkdtemp(prefix="portcullis-sweep-")
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
