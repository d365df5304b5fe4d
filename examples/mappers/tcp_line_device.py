#!/usr/bin/env python3
"""A simulated device that speaks the tcp-line protocol, for the tcp-line
mapper (tcp_line_mapper.py).

The protocol, one request per line over TCP, one answer line each:

    GET <prop>\\n          ->  <value>\\n        (or ERR <why>\\n)
    SET <prop> <value>\\n  ->  OK\\n             (or ERR <why>\\n)

Values are text: numbers as written (21.5), booleans as true/false.

Usage:
    tcp_line_device.py [--host 127.0.0.1] [--port 0] [--prop name=value ...]
                       [--read-only name ...] [--ramp name]

It prints `listening on <port>` on its first line of output (so a test can
start it on port 0), then `SET <prop> <value>` for every value written.
`--ramp temperature` adds 0.1 to that property on every GET, so its
readings move.
"""

import argparse
import socketserver
import sys
import threading


class Device:
    def __init__(self, values, read_only, ramp):
        self.values = dict(values)
        self.read_only = set(read_only)
        self.ramp = set(ramp)
        self.lock = threading.Lock()

    def handle(self, line):
        parts = line.strip().split(" ", 2)
        if len(parts) == 2 and parts[0] == "GET":
            with self.lock:
                name = parts[1]
                if name not in self.values:
                    return "ERR unknown property %s" % name
                value = self.values[name]
                if name in self.ramp:
                    self.values[name] = "%.1f" % (float(value) + 0.1)
                return value
        if len(parts) == 3 and parts[0] == "SET":
            name, value = parts[1], parts[2]
            with self.lock:
                if name not in self.values:
                    return "ERR unknown property %s" % name
                if name in self.read_only:
                    return "ERR %s is read-only" % name
                self.values[name] = value
            print("SET %s %s" % (name, value), flush=True)
            return "OK"
        return "ERR bad request"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--prop", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--read-only", action="append", default=[], metavar="NAME")
    ap.add_argument("--ramp", action="append", default=[], metavar="NAME")
    args = ap.parse_args()
    values = {}
    for p in args.prop or ["temperature=21.5", "setpoint=20"]:
        name, _, value = p.partition("=")
        values[name] = value
    device = Device(values, args.read_only, args.ramp)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            for raw in self.rfile:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self.wfile.write(b"ERR not utf-8\n")
                    continue
                self.wfile.write((device.handle(line) + "\n").encode("utf-8"))
                self.wfile.flush()

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    with socketserver.ThreadingTCPServer((args.host, args.port), Handler) as server:
        print("listening on %d" % server.server_address[1], flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
