#!/usr/bin/env python3
"""tcp-line: an external Yunbian mapper, Python standard library only.

It serves the devices whose spec says

    protocol:
      external:
        mapper: tcp-line
        config: {host: 10.0.0.7, port: 7000}
    properties:
      - name: temperature
        external: {name: temp}      # optional: the name on the device

and that speak a trivial text protocol over TCP (see tcp_line_device.py):
`GET <prop>` answers `<value>`, `SET <prop> <value>` answers `OK`.

What it does, following docs/mappers.md:
- registers with the agent over its unix socket (POST /v1/mappers);
- long-polls its device list (GET /v1/mappers/tcp-line/devices?since=…&wait=…),
  which is also its heartbeat, and registers again when the agent answers 404
  (the agent restarted);
- runs one thread per device: every collectCycle it applies desired values
  newer than those it applied (SET), reads every property (GET), and pushes
  the readings, the state (online/offline with the error) and the versions it
  applied (observedDesired) to POST /v1/devices/<device>/readings.

Usage:
    tcp_line_mapper.py [--socket /var/lib/yunbian/mapper.sock] [--name tcp-line] [-v]
"""

import argparse
import http.client
import json
import logging
import socket
import sys
import threading
import time
import urllib.parse

log = logging.getLogger("tcp-line")


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket: only connect() differs."""

    def __init__(self, path, timeout=10.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AgentError(Exception):
    def __init__(self, status, body):
        super().__init__("agent answered %d: %s" % (status, body))
        self.status = status
        self.body = body


class Agent:
    """The agent's mapper interface."""

    def __init__(self, path):
        self.path = path

    def call(self, method, url, body=None, timeout=10.0):
        conn = UnixHTTPConnection(self.path, timeout=timeout)
        try:
            headers = {}
            data = None
            if body is not None:
                data = json.dumps(body).encode("utf-8")
                headers["Content-Type"] = "application/json"
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        if resp.status >= 300:
            raise AgentError(resp.status, payload)
        return payload

    def register(self, name):
        return self.call("POST", "/v1/mappers", {"name": name, "protocols": ["tcp-line"]})

    def devices(self, name, since, wait_s):
        q = {"wait": "%ds" % wait_s}
        if since is not None:
            q["since"] = str(since)
        url = "/v1/mappers/%s/devices?%s" % (urllib.parse.quote(name), urllib.parse.urlencode(q))
        return self.call("GET", url, timeout=wait_s + 10.0)

    def push(self, device, body):
        return self.call("POST", "/v1/devices/%s/readings" % urllib.parse.quote(device), body)


class LineConnection:
    """One TCP connection to a tcp-line device."""

    def __init__(self, host, port, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rwb")

    def ask(self, line):
        self.file.write((line + "\n").encode("utf-8"))
        self.file.flush()
        answer = self.file.readline()
        if not answer.endswith(b"\n"):
            raise OSError("connection closed by the device")
        return answer.decode("utf-8", "replace").rstrip("\r\n")

    def close(self):
        for c in (self.file, self.sock):
            try:
                c.close()
            except OSError:
                pass


def to_wire(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return str(value)


def from_wire(text, ty):
    """Parses a device answer as the model's type; raises ValueError."""
    if ty == "int":
        return int(text)
    if ty == "float":
        return float(text)
    if ty == "bool":
        low = text.strip().lower()
        if low in ("true", "1", "on"):
            return True
        if low in ("false", "0", "off"):
            return False
        raise ValueError("%r is not a bool" % text)
    if ty == "bytes":
        return list(text.encode("utf-8"))
    return text


class DeviceWorker(threading.Thread):
    """Polls one device on its collectCycle and applies its desired values."""

    def __init__(self, agent, desc):
        super().__init__(daemon=True, name="device-" + desc["name"])
        self.agent = agent
        self.name_ = desc["name"]
        self.lock = threading.Lock()
        self.desc = desc
        self.applied = {}  # property -> desired version applied
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.conn = None

    def update(self, desc):
        with self.lock:
            self.desc = desc
        self.wake.set()

    def forget_applied(self):
        with self.lock:
            self.applied = {}
        self.wake.set()

    def stop(self):
        self.stopped.set()
        self.wake.set()

    def run(self):
        while not self.stopped.is_set():
            with self.lock:
                desc = self.desc
            started = time.monotonic()
            try:
                body = self.collect(desc)
            except (OSError, ValueError) as e:
                self.disconnect()
                body = {"state": "offline", "error": str(e) or type(e).__name__}
            try:
                self.agent.push(self.name_, body)
            except AgentError as e:
                log.warning("device %s: push refused: %s", self.name_, e)
            except OSError as e:
                log.debug("device %s: agent unreachable: %s", self.name_, e)
            cycle = max(desc.get("collectCycleMs", 1000), 50) / 1000.0
            self.wake.wait(max(0.0, cycle - (time.monotonic() - started)))
            self.wake.clear()
        self.disconnect()

    def disconnect(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def collect(self, desc):
        spec = desc["spec"]
        config = spec.get("protocol", {}).get("external", {}).get("config") or {}
        host = config.get("host", "127.0.0.1")
        port = int(config.get("port", 7000))
        timeout = float(config.get("timeoutSeconds", 2.0))
        if self.conn is None:
            self.conn = LineConnection(host, port, timeout)
        types = {p["name"]: p.get("type", "float") for p in desc["model"].get("properties", [])}
        wire_name = {}
        for v in spec.get("properties", []):
            ext = v.get("external") or {}
            wire_name[v["name"]] = ext.get("name", v["name"]) if isinstance(ext, dict) else v["name"]

        # Desired values first, so the readings below already show them.
        for prop, d in sorted(desc.get("desired", {}).items()):
            with self.lock:
                done = self.applied.get(prop, 0)
            if d["version"] <= done or prop not in wire_name:
                continue
            answer = self.conn.ask("SET %s %s" % (wire_name[prop], to_wire(d["value"])))
            if answer == "OK":
                log.info("device %s: %s = %r (version %d)", self.name_, prop, d["value"], d["version"])
                with self.lock:
                    self.applied[prop] = d["version"]
            else:
                log.warning("device %s: SET %s refused: %s", self.name_, prop, answer)

        readings = []
        now_ms = int(time.time() * 1000)
        for prop, wire in wire_name.items():
            answer = self.conn.ask("GET %s" % wire)
            if answer.startswith("ERR"):
                readings.append({"property": prop, "error": answer[3:].strip() or "device error", "ts": now_ms})
                continue
            try:
                value = from_wire(answer, types.get(prop, "string"))
            except ValueError as e:
                readings.append({"property": prop, "error": "unparsable value: %s" % e, "ts": now_ms})
                continue
            readings.append({"property": prop, "value": value, "ts": now_ms})
        with self.lock:
            applied = dict(self.applied)
        return {"readings": readings, "state": "online", "observedDesired": applied}


class Mapper:
    def __init__(self, agent, name):
        self.agent = agent
        self.name = name
        self.workers = {}

    def sync(self, devices):
        seen = set()
        for desc in devices:
            seen.add(desc["name"])
            w = self.workers.get(desc["name"])
            if w is None:
                log.info("serving device %s", desc["name"])
                w = DeviceWorker(self.agent, desc)
                self.workers[desc["name"]] = w
                w.start()
            else:
                w.update(desc)
        for name in list(self.workers):
            if name not in seen:
                log.info("device %s detached", name)
                self.workers.pop(name).stop()

    def run(self):
        since = None
        heartbeat = 10
        registered = False
        while True:
            try:
                if not registered:
                    reg = self.agent.register(self.name)
                    heartbeat = max(1, int(reg.get("heartbeatSeconds", 10)))
                    log.info("registered as %s (heartbeat %ds)", reg.get("mapper"), heartbeat)
                    registered = True
                    since = None
                    # Versions are only comparable within one registration.
                    for w in self.workers.values():
                        w.forget_applied()
                answer = self.agent.devices(self.name, since, heartbeat)
                since = answer["version"]
                self.sync(answer["devices"])
            except AgentError as e:
                if e.status == 404:
                    registered = False
                    continue
                log.warning("%s", e)
                time.sleep(1)
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                log.warning("agent unreachable: %s", e)
                registered = False
                time.sleep(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", default="/var/lib/yunbian/mapper.sock", help="the agent's mapper socket")
    ap.add_argument("--name", default="tcp-line", help="mapper name devices refer to")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        Mapper(Agent(args.socket), args.name).run()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
