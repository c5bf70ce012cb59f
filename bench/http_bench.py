#!/usr/bin/env python3
"""HTTP benchmark driver: signs HS256 tokens for N users, funds each through the admin
adjustment endpoint, writes a wrk Lua script per endpoint, runs wrk, and prints the figures
with the service's peak RSS. Called by bench/http.sh, which starts the service and fakes."""
import base64, hashlib, hmac, json, os, re, subprocess, sys, time, http.client, threading

BASE = os.environ["BENCH_BASE"]            # http://127.0.0.1:PORT
SECRET = os.environ["BENCH_JWT_SECRET"].encode()
ADMIN = os.environ["BENCH_ADMIN_TOKEN"]
PID = int(os.environ["BENCH_PID"])
USERS = int(os.environ.get("BENCH_USERS", "10000"))
DURATION = os.environ.get("BENCH_DURATION", "15s")
CONNECTIONS = os.environ.get("BENCH_CONNECTIONS", "32")
OUT = os.environ.get("BENCH_OUT", "target/bench")

def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

def token(user):
    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    claims = b64(json.dumps({"sub": user, "exp": int(time.time()) + 7200}).encode())
    sig = hmac.new(SECRET, f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(sig)}"

def fund(users, credits):
    host = BASE.split("//")[1]
    def work(chunk):
        conn = http.client.HTTPConnection(host)
        for u in chunk:
            body = json.dumps({"credits": credits, "reason": "benchmark funding"})
            conn.request("POST", f"/api/admin/accounts/{u}/adjustments", body,
                         {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
            r = conn.getresponse(); r.read()
            if r.status != 201:
                sys.exit(f"funding {u} failed: {r.status}")
    chunks = [users[i::8] for i in range(8)]
    threads = [threading.Thread(target=work, args=(c,)) for c in chunks]
    for t in threads: t.start()
    for t in threads: t.join()

LUA = """
local tokens = {}
for line in io.lines("%(tokens)s") do tokens[#tokens + 1] = line end
math.randomseed(os.time())
wrk.method = "%(method)s"
request = function()
  local t = tokens[math.random(#tokens)]
  return wrk.format(nil, "%(path)s", {["Authorization"] = "Bearer " .. t, ["Content-Type"] = "application/json"}, %(body)s)
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT requests=%%d duration_us=%%d p50_us=%%d p99_us=%%d non2xx=%%d connect=%%d read=%%d write=%%d timeout=%%d status=%%d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.status, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout, summary.errors.status))
end
"""

def peak_rss_mb():
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")

def scrape():
    """The service's /metrics (open: the bench sets no METRICS_TOKEN) as {name{labels}: value}."""
    host = BASE.split("//")[1]
    conn = http.client.HTTPConnection(host, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                values[key] = float(value)
            except ValueError:
                pass
    return values

class LagSampler(threading.Thread):
    """Samples the projector's lag (age of the oldest unprojected event) every 250 ms."""
    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event(); self.max_lag = 0.0; self.max_pending = 0
    def run(self):
        while not self.stop.wait(0.25):
            try:
                m = scrape()
            except OSError:
                continue
            self.max_lag = max(self.max_lag, m.get("projector_lag_seconds", 0.0))
            self.max_pending = max(self.max_pending, int(m.get("projector_pending_events", 0)))

def own_reads():
    m = scrape()
    return (m.get('own_reads_total{projection="current"}', 0.0),
            m.get('own_reads_total{projection="caught_up"}', 0.0))

def run_wrk(name, method, path, body):
    sampler = LagSampler(); sampler.start()
    before = own_reads()
    script = os.path.join(OUT, f"{name}.lua")
    with open(script, "w") as f:
        f.write(LUA % {"tokens": os.path.join(OUT, "tokens.txt"), "method": method, "path": path,
                       "body": "nil" if body is None else json.dumps(body)})
    out = subprocess.run(["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{DURATION}", "--latency", "-s", script, BASE],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"RESULT (.*)", out)
    fields = dict(kv.split("=") for kv in m.group(1).split())
    n = int(fields["requests"]); secs = int(fields["duration_us"]) / 1e6
    errors = sum(int(fields[k]) for k in ("non2xx", "connect", "read", "write", "timeout"))
    sampler.stop.set(); sampler.join()
    after = own_reads()
    current, caught_up = after[0] - before[0], after[1] - before[1]
    return {"endpoint": f"{method} {path}", "requests": n, "rps": n / secs,
            "p50_ms": int(fields["p50_us"]) / 1000, "p99_ms": int(fields["p99_us"]) / 1000, "errors": errors,
            "max_lag_s": sampler.max_lag, "max_pending": sampler.max_pending,
            "own_reads": int(current + caught_up), "caught_up": int(caught_up)}

def main():
    os.makedirs(OUT, exist_ok=True)
    users = [f"bench-user-{i:05d}" for i in range(USERS)]
    with open(os.path.join(OUT, "tokens.txt"), "w") as f:
        for u in users:
            f.write(token(u) + "\n")
    t0 = time.time(); fund(users, 100000)
    print(f"funded {USERS} users in {time.time() - t0:.1f}s", flush=True)
    time.sleep(2)
    results = [run_wrk("generate", "POST", "/api/video/generate", json.dumps({"prompt": "benchmark: a red fox running through snow"})),
               run_wrk("stats", "GET", "/api/stats", None)]
    rss = peak_rss_mb()
    print(f"{'endpoint':<26}{'requests':>10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'max lag s':>11}{'pending':>9}{'own reads':>11}{'caught up':>11}")
    for r in results:
        print(f"{r['endpoint']:<26}{r['requests']:>10}{r['rps']:>10.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['errors']:>8}"
              f"{r['max_lag_s']:>11.3f}{r['max_pending']:>9}{r['own_reads']:>11}{r['caught_up']:>11}")
    print(f"service peak RSS: {rss:.1f} MB")
    with open(os.path.join(OUT, "http.json"), "w") as f:
        json.dump({"results": results, "peak_rss_mb": rss}, f, indent=2)

if __name__ == "__main__":
    main()
