"""A service in another language sharing flagcache's Redis cache, as existing services
do: entries {"flagConfig": ..., "version": N} (gzip'd when asked) under the key the
caller names, and messages {"flagKey": ..., "version": N} on a pub/sub channel.

Commands (each prints one JSON line, or "ready" then messages for `listen`):
  write   --url U --key REDIS_KEY --flag FLAG --version N --config JSON
          [--gzip] [--string-version] [--channel C]   (publishes when --channel is given)
  read    --url U --key REDIS_KEY
  publish --url U --channel C --message TEXT
  listen  --url U --channel C --count N [--timeout S]
"""

import argparse
import gzip
import json
import sys
import time

import redis

GZIP_MAGIC = b"\x1f\x8b"


def write(r, a):
    version = str(a.version) if a.string_version else a.version
    body = json.dumps({"flagConfig": json.loads(a.config), "version": version}).encode()
    if a.gzip:
        body = gzip.compress(body)
    r.set(a.key, body, ex=300)
    if a.channel:
        r.publish(a.channel, json.dumps({"flagKey": a.flag, "version": a.version}))
    print(json.dumps({"written": len(body)}))


def read(r, a):
    raw = r.get(a.key)
    if raw is None:
        print(json.dumps(None))
        return
    compressed = raw[:2] == GZIP_MAGIC
    if compressed:
        raw = gzip.decompress(raw)
    doc = json.loads(raw)
    out = {"flagConfig": doc["flagConfig"], "version": doc["version"], "gzip": compressed}
    print(json.dumps(out, sort_keys=True))


def publish(r, a):
    print(json.dumps({"receivers": r.publish(a.channel, a.message)}))


def listen(r, a):
    p = r.pubsub()
    p.subscribe(a.channel)
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        m = p.get_message(timeout=0.5)
        if m and m["type"] == "subscribe":
            break
    else:
        sys.exit("not subscribed in time")
    print("ready", flush=True)
    seen = 0
    while seen < a.count and time.monotonic() < deadline:
        m = p.get_message(timeout=0.5)
        if m and m["type"] == "message":
            print(json.dumps(json.loads(m["data"]), sort_keys=True), flush=True)
            seen += 1
    if seen < a.count:
        sys.exit(f"heard {seen} of {a.count} messages")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--key", required=True)
    w.add_argument("--flag", required=True)
    w.add_argument("--version", type=int, required=True)
    w.add_argument("--config", required=True)
    w.add_argument("--gzip", action="store_true")
    w.add_argument("--string-version", action="store_true")
    w.add_argument("--channel")
    rd = sub.add_parser("read")
    rd.add_argument("--key", required=True)
    pb = sub.add_parser("publish")
    pb.add_argument("--channel", required=True)
    pb.add_argument("--message", required=True)
    ls = sub.add_parser("listen")
    ls.add_argument("--channel", required=True)
    ls.add_argument("--count", type=int, default=1)
    ls.add_argument("--timeout", type=float, default=20.0)
    for p in (w, rd, pb, ls):
        p.add_argument("--url", required=True)
    a = ap.parse_args()
    r = redis.Redis.from_url(a.url)
    {"write": write, "read": read, "publish": publish, "listen": listen}[a.cmd](r, a)


if __name__ == "__main__":
    main()
