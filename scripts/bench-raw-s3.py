#!/usr/bin/env python3
"""A minimal S3 client for scripts/bench: the "raw S3 ceiling" and a few chores.

Standard library only (http.client + a hand-written AWS Signature V4), path-style URLs, one
keep-alive connection per worker process, so the client costs as little CPU as Python allows
and the number mostly shows what the S3 server itself can do on this machine.

    bench-raw-s3.py mkbucket BUCKET
        creates the bucket if missing, and writes and deletes one object in it
    bench-raw-s3.py bench BUCKET PREFIX OBJECT_SIZE CONCURRENCY SECONDS
        PUT objects of OBJECT_SIZE bytes for SECONDS with CONCURRENCY processes, then GET them
        back for SECONDS; prints one line per phase:
            put|get <ops> <bytes> <seconds> <errors> <machine busy ticks> <server ticks> <stolen %>
        (clock ticks of all cores busy, and of the S3 server's process BENCH_SERVER_PID, during the phase;
        the share of the machine's time the hypervisor gave to others meanwhile)
    bench-raw-s3.py cleanup BUCKET PREFIX
        deletes every object under PREFIX (ListObjectsV2 + DeleteObjects, 1000 at a time)

Credentials and endpoint come from NBDS3_S3_ENDPOINT, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY and AWS_REGION (what `scripts/seaweedfs start` or `scripts/garage start` exports).

Payloads are sent as UNSIGNED-PAYLOAD unless BENCH_RAW_SIGNED=1 (then SHA-256-hashed, as SDKs
do over plain http), so by default the client spends no CPU hashing.

Small GETs: Garage does not set TCP_NODELAY, so a response split into two segments waits for
the client's delayed ACK (~40 ms). Each request here re-arms TCP_QUICKACK before reading the
response, which is what a well-behaved low-latency client does; BENCH_RAW_QUICKACK=0 turns
that off to show the difference.
"""

import base64
import datetime
import hashlib
import hmac
import http.client
import multiprocessing
import os
import re
import socket
import sys
import time
import urllib.parse

ENDPOINT = os.environ.get("NBDS3_S3_ENDPOINT", "http://127.0.0.1:3900")
ACCESS = os.environ["AWS_ACCESS_KEY_ID"]
SECRET = os.environ["AWS_SECRET_ACCESS_KEY"]
REGION = os.environ.get("AWS_REGION", "us-east-1")
QUICKACK = os.environ.get("BENCH_RAW_QUICKACK", "1") != "0"
# By default the payload is not hashed (x-amz-content-sha256: UNSIGNED-PAYLOAD), the cheapest
# request S3 accepts; BENCH_RAW_SIGNED=1 hashes it with SHA-256 as most SDKs do over http.
SIGNED = os.environ.get("BENCH_RAW_SIGNED", "0") == "1"
UNSIGNED = "UNSIGNED-PAYLOAD"

_url = urllib.parse.urlsplit(ENDPOINT)
if _url.scheme != "http":
    sys.exit(f"bench-raw-s3: only http:// endpoints are supported, not {ENDPOINT}")
HOST = _url.hostname
PORT = _url.port or 80
HOST_HEADER = _url.netloc


def _hmac(key, text):
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _signing_key(date):
    k = _hmac(("AWS4" + SECRET).encode(), date)
    k = _hmac(k, REGION)
    k = _hmac(k, "s3")
    return _hmac(k, "aws4_request")


_key_cache = {}


def sign(method, path, query, headers, payload_hash):
    """Adds the SigV4 headers to `headers` (a dict with lower-case names)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    headers["host"] = HOST_HEADER
    headers["x-amz-date"] = amz_date
    headers["x-amz-content-sha256"] = payload_hash
    names = sorted(headers)
    canonical_headers = "".join(f"{n}:{str(headers[n]).strip()}\n" for n in names)
    signed = ";".join(names)
    canonical_query = query_string(query)
    canonical = "\n".join(
        [method, urllib.parse.quote(path, safe="/-_.~"), canonical_query, canonical_headers,
         signed, payload_hash])
    scope = f"{date}/{REGION}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    if date not in _key_cache:
        _key_cache[date] = _signing_key(date)
    signature = hmac.new(_key_cache[date], to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={ACCESS}/{scope}, SignedHeaders={signed}, "
        f"Signature={signature}")
    return headers


def query_string(query):
    """The canonical query string; also what goes on the wire, so the two always agree."""
    return "&".join(
        f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
        for k, v in sorted(query.items()))


class Client:
    def __init__(self):
        self.conn = None

    def _connect(self):
        self.conn = http.client.HTTPConnection(HOST, PORT, timeout=60)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(self, method, path, query=None, body=b"", extra=None):
        """Returns (status, body). Retries once on a dropped keep-alive connection."""
        query = query or {}
        for attempt in (1, 2):
            if self.conn is None:
                self._connect()
            headers = dict(extra or {})
            if body:
                headers["content-length"] = str(len(body))
            payload_hash = hashlib.sha256(body).hexdigest() if SIGNED else UNSIGNED
            sign(method, path, query, headers, payload_hash)
            url = urllib.parse.quote(path, safe="/-_.~")
            if query:
                url += "?" + query_string(query)
            try:
                self.conn.request(method, url, body=body or None, headers=headers)
                if QUICKACK:
                    self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                resp = self.conn.getresponse()
                data = resp.read()
                return resp.status, data
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def mkbucket(bucket):
    client = Client()
    status, body = client.request("PUT", f"/{bucket}")
    if status != 200 and b"BucketAlreadyOwnedByYou" not in body and b"BucketAlreadyExists" not in body:
        print(f"bench-raw-s3: CreateBucket {bucket}: HTTP {status}: {body[:300]!r}", file=sys.stderr)
        return 1
    # SeaweedFS makes a bucket's volumes on its first write (0.2 s or more): done here, so that
    # the first measurement does not pay for it.
    key = f"/{bucket}/mkbucket-warm-up-{os.getpid()}"
    for method, body in (("PUT", b"warm-up"), ("DELETE", b"")):
        status, resp = client.request(method, key, body=body)
        if status not in (200, 204):
            print(f"bench-raw-s3: {method} {key}: HTTP {status}: {resp[:300]!r}", file=sys.stderr)
            return 1
    return 0


def _worker(args):
    """One process: PUT phase then GET phase, both aligned on shared wall-clock start times."""
    bucket, prefix, size, worker, put_start, seconds, get_start = args
    client = Client()
    client._connect()
    # Every PUT carries bytes no other PUT carried, as a device's blocks do: Garage stores data
    # by content hash and could deduplicate a repeated payload (measured on Garage 2.5 at 1 MiB:
    # no difference beyond noise, but a ceiling should not depend on it). A 16-byte stamp in
    # every 4 KiB makes each object, and each of Garage's blocks, unique.
    payload = bytearray(os.urandom(size))
    stamps = range(0, size, 4096)
    keys = []
    put_ops = put_err = 0
    put_end = put_start
    while time.time() < put_start:
        time.sleep(0.001)
    deadline = put_start + seconds
    while time.time() < deadline:
        key = f"/{bucket}/{prefix}/w{worker:02d}/{put_ops:08d}"
        stamp = f"{worker:04d}{put_ops + put_err:012d}".encode()
        for at in stamps:
            payload[at:at + 16] = stamp
        status, _ = client.request("PUT", key, body=bytes(payload))
        if status == 200:
            keys.append(key)
            put_ops += 1
        else:
            put_err += 1
        put_end = time.time()
    get_ops = get_err = 0
    get_end = get_start
    while time.time() < get_start:
        time.sleep(0.001)
    deadline = get_start + seconds
    i = 0
    while keys and time.time() < deadline:
        status, data = client.request("GET", keys[i % len(keys)])
        if status == 200 and len(data) == size:
            get_ops += 1
        else:
            get_err += 1
        i += 1
        get_end = time.time()
    return put_ops, put_err, put_end, get_ops, get_err, get_end


def _machine_ticks():
    """(busy, stolen, all) clock ticks of all cores, from /proc/stat: busy is neither idle nor
    waiting for I/O, stolen (counted in busy too) is time the hypervisor gave to others."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], v[7], sum(v[:8])


def _server_ticks():
    """Clock ticks of the process BENCH_SERVER_PID (0 if unset or gone)."""
    try:
        with open(f"/proc/{os.environ['BENCH_SERVER_PID']}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (KeyError, OSError, ValueError, IndexError):
        return 0


def _cpu_during(start, seconds):
    """(machine busy ticks, server ticks, % stolen) from `start` for `seconds`, sleeping until
    then."""
    time.sleep(max(0.0, start - time.time()))
    machine, server = _machine_ticks(), _server_ticks()
    time.sleep(max(0.0, start + seconds - time.time()))
    busy, stolen, total = (b - a for a, b in zip(machine, _machine_ticks()))
    return busy, _server_ticks() - server, 100 * stolen / total if total else 0


def bench(bucket, prefix, size, concurrency, seconds):
    put_start = time.time() + 1.0 + 0.05 * concurrency  # time for every process to connect
    get_start = put_start + seconds + 1.5  # the slowest PUT in flight finishes before GETs begin
    jobs = [(bucket, prefix, size, w, put_start, seconds, get_start) for w in range(concurrency)]
    with multiprocessing.Pool(concurrency) as pool:
        pending = pool.map_async(_worker, jobs)
        put_cpu = _cpu_during(put_start, seconds)
        get_cpu = _cpu_during(get_start, seconds)
        results = pending.get()
    put_ops = sum(r[0] for r in results)
    put_err = sum(r[1] for r in results)
    put_secs = max(r[2] for r in results) - put_start
    get_ops = sum(r[3] for r in results)
    get_err = sum(r[4] for r in results)
    get_secs = max(r[5] for r in results) - get_start
    for op, ops, secs, err, (busy, server, stolen) in (("put", put_ops, put_secs, put_err, put_cpu),
                                                       ("get", get_ops, get_secs, get_err, get_cpu)):
        # CPU rates over the phase's planned window, scaled to the time it really took.
        scale = secs / seconds
        print(f"{op} {ops} {ops * size} {secs:.3f} {err} {busy * scale:.0f} {server * scale:.0f} {stolen:.0f}")
    return 0 if put_ops and get_ops else 1


def cleanup(bucket, prefix):
    client = Client()
    deleted = 0
    token = None
    while True:
        query = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
        if token:
            query["continuation-token"] = token
        status, body = client.request("GET", f"/{bucket}", query=query)
        if status == 404:
            return 0
        if status != 200:
            print(f"bench-raw-s3: ListObjectsV2: HTTP {status}: {body[:300]!r}", file=sys.stderr)
            return 1
        text = body.decode()
        keys = re.findall(r"<Key>(.*?)</Key>", text)
        if keys:
            xml = "<Delete><Quiet>true</Quiet>" + "".join(
                f"<Object><Key>{k}</Key></Object>" for k in keys) + "</Delete>"
            data = xml.encode()
            md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
            status, resp = client.request(
                "POST", f"/{bucket}", query={"delete": ""}, body=data,
                extra={"content-md5": md5, "content-type": "application/xml"})
            if status != 200 or b"<Error>" in resp:
                print(f"bench-raw-s3: DeleteObjects: HTTP {status}: {resp[:300]!r}", file=sys.stderr)
                return 1
            deleted += len(keys)
        m = re.search(r"<NextContinuationToken>(.*?)</NextContinuationToken>", text)
        if "<IsTruncated>true</IsTruncated>" not in text or not m:
            break
        token = m.group(1)
    print(f"deleted {deleted}")
    return 0


def parse_size(text):
    m = re.fullmatch(r"(\d+)([KMG]?)", text.upper())
    if not m:
        raise SystemExit(f"bench-raw-s3: bad size {text!r}")
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]


def main(argv):
    if len(argv) >= 2 and argv[0] == "mkbucket":
        return mkbucket(argv[1])
    if len(argv) == 6 and argv[0] == "bench":
        return bench(argv[1], argv[2], parse_size(argv[3]), int(argv[4]), float(argv[5]))
    if len(argv) == 3 and argv[0] == "cleanup":
        return cleanup(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
