#!/usr/bin/env python3
"""Real-peer scenarios for the yunbian edge MQTT broker, using paho-mqtt 2.x.

Each subcommand connects to the broker at --host/--port, runs one scenario,
prints one JSON line with what it observed and exits 0; on a failure it
prints the reason to stderr and exits 1. The Rust tests (tests/bus_paho.rs,
tests/bus_tls_auth.rs) assert on the JSON.

  qos-count    --qos N --count K --version 3|5   exactly-once / at-least-once counts
  persistent   --version 3|5                      queued QoS 1 delivered after reconnect
  will         --version 3|5                      will published on an abrupt close
  props                                           v5 request/response properties round trip
  connect      [--username U --password P] [--tls-ca F [--cert F --key F]] --version 3|5
                                                  prints the CONNACK reason code (or the TLS error)
  tls-roundtrip --tls-ca F [--cert F --key F]     publish/subscribe over TLS
"""
import argparse
import json
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PATIENCE = 15.0


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def proto(version):
    return mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311


class Peer:
    """A paho client with its network loop in a thread and a message log."""

    def __init__(self, args, client_id=None, clean=True, version=None, expiry=None, tls=True):
        self.version = version or args.version
        self.messages = []
        self.cond = threading.Condition()
        self.connack = None
        cid = client_id if client_id is not None else "paho-" + uuid.uuid4().hex[:8]
        kwargs = dict(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto(self.version))
        if self.version != 5:
            kwargs["clean_session"] = clean
        self.c = mqtt.Client(**kwargs)
        self.clean = clean
        self.expiry = expiry
        if tls and getattr(args, "tls_ca", None):
            self.c.tls_set(ca_certs=args.tls_ca, certfile=getattr(args, "cert", None), keyfile=getattr(args, "key", None))
        if getattr(args, "username", None):
            self.c.username_pw_set(args.username, getattr(args, "password", None))
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_disconnect = self._on_disconnect
        self.subacks = 0
        self.disconnected = False

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.connack = (reason_code.value, flags.session_present)
            self.cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.disconnected = True
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.subacks += 1
            self.cond.notify_all()

    def connect(self, args, expect_ok=True):
        props = None
        if self.version == 5:
            props = Properties(PacketTypes.CONNECT)
            if self.expiry is not None:
                props.SessionExpiryInterval = self.expiry
            kw = dict(clean_start=self.clean, properties=props)
        else:
            kw = {}
        self.c.connect(args.host, args.port, keepalive=30, **kw)
        self.c.loop_start()
        self.wait(lambda: self.connack is not None or self.disconnected, "CONNACK")
        if self.connack is None:
            if expect_ok:
                fail("connection closed before CONNACK")
            return None
        if expect_ok and self.connack[0] != 0:
            fail(f"connect refused: {self.connack}")
        return self.connack

    def wait(self, pred, what, timeout=PATIENCE):
        with self.cond:
            if not self.cond.wait_for(pred, timeout):
                fail(f"timed out waiting for {what}")

    def subscribe(self, topic, qos, props=None):
        before = self.subacks
        if self.version == 5:
            self.c.subscribe(topic, options=mqtt.SubscribeOptions(qos=qos), properties=props)
        else:
            self.c.subscribe(topic, qos)
        self.wait(lambda: self.subacks > before, "SUBACK")

    def stop(self):
        self.c.disconnect()
        self.c.loop_stop()


def cmd_qos_count(args):
    sub = Peer(args)
    sub.connect(args)
    topic = "paho/qos/" + uuid.uuid4().hex[:6]
    sub.subscribe(topic, args.qos)
    pub = Peer(args)
    pub.connect(args)
    infos = [pub.c.publish(topic, f"m{i}", qos=args.qos) for i in range(args.count)]
    for info in infos:
        info.wait_for_publish(PATIENCE)
    sub.wait(lambda: len(sub.messages) >= args.count, f"{args.count} messages")
    time.sleep(0.3)  # let any duplicate arrive before counting
    payloads = [m.payload.decode() for m in sub.messages]
    out = {
        "received": len(payloads),
        "unique": len(set(payloads)),
        "in_order": payloads[: args.count] == [f"m{i}" for i in range(args.count)],
        "qos": sorted(set(m.qos for m in sub.messages)),
    }
    pub.stop()
    sub.stop()
    print(json.dumps(out))


def cmd_persistent(args):
    cid = "paho-persist-" + uuid.uuid4().hex[:6]
    topic = "paho/persist/" + cid
    a = Peer(args, client_id=cid, clean=False if args.version == 3 else False, expiry=300)
    first = a.connect(args)
    a.subscribe(topic, 1)
    a.stop()
    pub = Peer(args)
    pub.connect(args)
    for i in range(5):
        pub.c.publish(topic, f"queued{i}", qos=1).wait_for_publish(PATIENCE)
    pub.stop()
    b = Peer(args, client_id=cid, clean=False, expiry=300)
    second = b.connect(args)
    b.wait(lambda: len(b.messages) >= 5, "5 queued messages")
    out = {
        "first_session_present": bool(first[1]),
        "second_session_present": bool(second[1]),
        "payloads": [m.payload.decode() for m in b.messages],
    }
    b.stop()
    print(json.dumps(out))


def cmd_will(args):
    topic = "paho/will/" + uuid.uuid4().hex[:6]
    watcher = Peer(args)
    watcher.connect(args)
    watcher.subscribe(topic, 1)
    dying = Peer(args)
    dying.c.will_set(topic, b"gone", qos=1, retain=False)
    dying.connect(args)
    # Abrupt close: no DISCONNECT packet.
    dying.c.loop_stop()
    dying.c.socket().close()
    watcher.wait(lambda: len(watcher.messages) >= 1, "will message")
    m = watcher.messages[0]
    # A clean DISCONNECT must not publish the will.
    polite = Peer(args)
    polite.c.will_set(topic, b"should-not-appear", qos=1)
    polite.connect(args)
    polite.stop()
    time.sleep(0.5)
    out = {"topic": m.topic, "payload": m.payload.decode(), "count": len(watcher.messages)}
    watcher.stop()
    print(json.dumps(out))


def cmd_props(args):
    args.version = 5
    req_topic = "paho/req/" + uuid.uuid4().hex[:6]
    resp_topic = "paho/resp/" + uuid.uuid4().hex[:6]
    responder = Peer(args)
    responder.connect(args)
    responder.subscribe(req_topic, 1)
    requester = Peer(args)
    requester.connect(args)
    requester.subscribe(resp_topic, 1)

    p = Properties(PacketTypes.PUBLISH)
    p.ResponseTopic = resp_topic
    p.CorrelationData = b"\x00\x01corr"
    p.UserProperty = [("k1", "v1"), ("k1", "v2"), ("unit", "\u00b0C")]
    p.ContentType = "application/json"
    p.MessageExpiryInterval = 3600
    requester.c.publish(req_topic, b'{"q":1}', qos=1, properties=p).wait_for_publish(PATIENCE)

    responder.wait(lambda: len(responder.messages) >= 1, "request")
    req = responder.messages[0]
    rp = req.properties
    got_req = {
        "response_topic": getattr(rp, "ResponseTopic", None),
        "correlation": getattr(rp, "CorrelationData", b"").hex(),
        "user": [list(x) for x in getattr(rp, "UserProperty", [])],
        "content_type": getattr(rp, "ContentType", None),
        "expiry_le_3600": 0 < getattr(rp, "MessageExpiryInterval", 0) <= 3600,
    }
    reply = Properties(PacketTypes.PUBLISH)
    reply.CorrelationData = rp.CorrelationData
    responder.c.publish(rp.ResponseTopic, b"pong", qos=1, properties=reply).wait_for_publish(PATIENCE)
    requester.wait(lambda: len(requester.messages) >= 1, "response")
    resp = requester.messages[0]
    out = {
        "request": got_req,
        "response_payload": resp.payload.decode(),
        "response_correlation": getattr(resp.properties, "CorrelationData", b"").hex(),
    }
    responder.stop()
    requester.stop()
    print(json.dumps(out))


def cmd_connect(args):
    peer = Peer(args)
    try:
        ack = peer.connect(args, expect_ok=False)
    except Exception as e:  # TLS refused, connection reset...
        print(json.dumps({"error": type(e).__name__}))
        return
    if ack is None:
        peer.c.loop_stop()
        print(json.dumps({"error": "closed before CONNACK"}))
        return
    code = ack[0]
    peer.c.loop_stop()
    print(json.dumps({"code": code}))


def cmd_tls_roundtrip(args):
    sub = Peer(args)
    sub.connect(args)
    topic = "paho/tls/" + uuid.uuid4().hex[:6]
    sub.subscribe(topic, 1)
    pub = Peer(args)
    pub.connect(args)
    pub.c.publish(topic, b"secure", qos=1).wait_for_publish(PATIENCE)
    sub.wait(lambda: len(sub.messages) >= 1, "message over TLS")
    out = {"payload": sub.messages[0].payload.decode()}
    pub.stop()
    sub.stop()
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--version", type=int, default=5, choices=[3, 5])
    ap.add_argument("--qos", type=int, default=1)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--username")
    ap.add_argument("--password")
    ap.add_argument("--tls-ca", dest="tls_ca")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    args = ap.parse_args()
    cmds = {
        "qos-count": cmd_qos_count,
        "persistent": cmd_persistent,
        "will": cmd_will,
        "props": cmd_props,
        "connect": cmd_connect,
        "tls-roundtrip": cmd_tls_roundtrip,
    }
    if args.command not in cmds:
        fail(f"unknown command {args.command}")
    cmds[args.command](args)


if __name__ == "__main__":
    main()
