"""A service in another language sharing flagcache's memcached cache: entries in the
JSON layout {"flagConfig": ..., "version": N} at `<namespace>:<flag key>`, and events
appended to the invalidation log as the flagcache-memcached crate docs specify it
("The invalidation log format"). Written from that text, not from the crate's source.

Commands (each prints one JSON line):
  write  --server H:P --namespace NS --flag FLAG --version N --config JSON
  read   --server H:P --namespace NS --flag FLAG
  append --server H:P --namespace NS --ring R --flag FLAG [--version N]
         [--layout json|envelope]
"""

import argparse
import json
import struct

from pymemcache.client.base import Client

SLOT_TTL = 3600


def take_number(c, ns):
    """Step 1: increment the counter; create it at 1 when it is missing."""
    counter = f"{ns}!inv:seq"
    while True:
        n = c.incr(counter, 1, noreply=False)
        if n is not None:
            return int(n)
        if c.add(counter, b"1", expire=0, noreply=False):
            return 1


def msgpack(v):
    """The few MessagePack forms the envelope event uses."""
    if v is None:
        return b"\xc0"
    if v is True or v is False:
        return b"\xc3" if v else b"\xc2"
    if isinstance(v, int):
        return b"\xcf" + struct.pack(">Q", v)
    if isinstance(v, str):
        b = v.encode()
        return (bytes([0xA0 | len(b)]) if len(b) < 32 else b"\xd9" + bytes([len(b)])) + b
    if isinstance(v, dict):
        out = bytes([0x80 | len(v)])
        for k, x in v.items():
            out += msgpack(k) + msgpack(x)
        return out
    raise TypeError(v)


def event(a):
    if a.layout == "json":
        ev = {"flagKey": a.flag}
        if a.version is not None:
            ev["version"] = a.version
        return json.dumps(ev).encode()
    ev = {"target": {"Key": a.flag}, "version": a.version, "origin": 0, "seq": 0, "sent_at_ms": 0}
    return b"\xf1\xa7\x01" + msgpack(ev)


def append(c, a):
    n = take_number(c, a.namespace)
    # Step 2: the slot holds n (8 bytes, big-endian), then the event.
    slot = f"{a.namespace}!inv:{n % a.ring}"
    if not c.set(slot, struct.pack(">Q", n) + event(a), expire=SLOT_TTL, noreply=False):
        raise SystemExit(f"slot {slot} not stored")
    print(json.dumps({"number": n, "slot": slot}))


def write(c, a):
    doc = {"flagConfig": json.loads(a.config), "version": a.version}
    c.set(f"{a.namespace}:{a.flag}", json.dumps(doc).encode(), expire=300, noreply=False)
    print(json.dumps({"written": True}))


def read(c, a):
    raw = c.get(f"{a.namespace}:{a.flag}")
    if raw is None:
        print(json.dumps(None))
        return
    doc = json.loads(raw)
    print(json.dumps({"flagConfig": doc["flagConfig"], "version": doc["version"]}, sort_keys=True))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--version", type=int, required=True)
    w.add_argument("--config", required=True)
    rd = sub.add_parser("read")
    ap_ = sub.add_parser("append")
    ap_.add_argument("--ring", type=int, default=1024)
    ap_.add_argument("--version", type=int)
    ap_.add_argument("--layout", choices=["json", "envelope"], default="json")
    for p in (w, rd, ap_):
        p.add_argument("--server", required=True)
        p.add_argument("--namespace", default="flags")
        p.add_argument("--flag", required=True)
    a = ap.parse_args()
    host, port = a.server.rsplit(":", 1)
    c = Client((host, int(port)), connect_timeout=5, timeout=5)
    {"write": write, "read": read, "append": append}[a.cmd](c, a)


if __name__ == "__main__":
    main()
