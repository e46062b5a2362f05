#!/usr/bin/env python3
"""Idle keep-alive clients: what each costs a proxy in memory, and whether they slow the others.

Legacy apps hold keep-alive connections open for minutes. This opens CONNS connections to a
proxy (loopback only), sends one request on each and reads its answer, then leaves them open
and idle; it reads the proxy's RSS (summed over PIDS) before and after, and a wrk run's p99
before and while they are held; then it closes them and reads the RSS once more.

    benches/idle.py http://127.0.0.1:18090 PID [PID...]      # CONNS=5000 by default
    CONNS=5000 PATH_Q=/api/apps/v1/robot/groups?group_id=1 benches/idle.py URL PID

Needs wrk for the p99 (skipped without it) and a file-descriptor limit above CONNS in this
process and in the proxy (`ulimit -n`). Every connection it opened is closed before it ends.
"""
import os
import re
import socket
import subprocess
import sys
import time

try:
    CONNS = int(os.environ.get("CONNS", "5000"))
except ValueError:
    sys.exit("idle.py: CONNS must be a number")
PATH_Q = os.environ.get("PATH_Q", "/api/apps/v1/robot/groups?group_id=1")
WRK = os.environ.get("WRK", "wrk")


def rss_kb(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def p99_ms(url):
    try:
        out = subprocess.run(
            [WRK, "-t1", "-c32", "-d5s", "--latency", url + PATH_Q],
            capture_output=True, text=True, timeout=60,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\b", out, re.M)
    if not m:
        return None
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def one_request(host, port):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(f"GET {PATH_Q} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("closed before the answer's head")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(m.group(1)) if m else 0
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("closed before the answer's end")
        body += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.split(b"\r\n")[0].decode(errors="replace"))
    return s


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    url = sys.argv[1].rstrip("/")
    if not all(p.isdigit() and os.path.exists(f"/proc/{p}/status") for p in sys.argv[2:]):
        sys.exit("idle.py: every PID must be a running process's number")
    pids = [int(p) for p in sys.argv[2:]]
    if CONNS < 1:
        sys.exit("idle.py: CONNS must be a positive number")
    m = re.fullmatch(r"http://(127\.0\.0\.1|localhost|\[::1\]):(\d+)", url)
    if not m or not 0 < int(m.group(2)) < 65536:
        sys.exit("idle.py: URL must be http://127.0.0.1:PORT (loopback only, port 1-65535)")
    host, port = m.group(1).strip("[]"), int(m.group(2))
    if subprocess.run(["sh", "-c", f"command -v {WRK}"], capture_output=True).returncode != 0:
        print(f"idle.py: {WRK} not found; p99 figures will be '-'", file=sys.stderr)
    try:
        one_request(host, port).close()
    except (OSError, RuntimeError) as e:
        sys.exit(f"idle.py: {url}{PATH_Q} does not answer 200: {e}")
    time.sleep(1)
    rss0, p0 = rss_kb(pids), p99_ms(url)
    held = []
    try:
        for _ in range(CONNS):
            try:
                held.append(one_request(host, port))
            except (OSError, RuntimeError) as e:
                sys.exit(f"idle.py: connection {len(held) + 1} failed: {e} (ulimit -n?)")
        time.sleep(2)
        rss1 = rss_kb(pids)
        p1 = p99_ms(url)
        rss_held = rss_kb(pids)
    finally:
        for s in held:
            s.close()
    time.sleep(2)
    rss2 = rss_kb(pids)
    per = (rss1 - rss0) * 1024 / CONNS
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    print(f"conns={CONNS} rss_before_kb={rss0} rss_idle_kb={rss1} rss_idle_after_wrk_kb={rss_held} "
          f"rss_after_close_kb={rss2} growth_per_conn_bytes={per:.0f} "
          f"p99_ms_before={fmt(p0)} p99_ms_with_idle={fmt(p1)}")


if __name__ == "__main__":
    main()
