"""A data generator for the lossless store-and-forward test: publishes N
readings to the edge broker with paho-mqtt at a steady rate, QoS 1.

Reading i is {"v": value(i), "ts": base + i * period_ms} on topic TOPIC:
distinct timestamps, so a reading sent twice is the same point (the store's
last write at a timestamp wins) and the receiver can count exactly.

Like a device with a local buffer, the generator survives the broker going
away (the agent killed, restarted): it reconnects and re-sends the readings
of the last REPLAY seconds, since readings the agent acknowledged but had
not yet written to disk died with it (the agent acknowledges a QoS 1
PUBLISH once its rules have it in memory, not once it is on disk). The
cloud recognises batches it already stored, not readings: a replayed
reading is a new point at an existing timestamp, which the store keeps
once (last write wins).

Prints "done N reconnects R sent S connects C" at the end: S counts every
PUBLISH attempted (replays included), C every connection made, so the
receiver can bound what it stores: paho re-sends at most the one message
in flight on each new connection, hence at most S + C readings arrive.

usage: mqtt_generator.py HOST PORT TOPIC N RATE BASE_MS PERIOD_MS
"""

import sys
import time

import paho.mqtt.client as mqtt

REPLAY = 5.0


def value(i):
    # Tenths, so the receiver can check an exact integer checksum.
    return (i * 7919 % 1000) / 10.0


# Connections made so far (paho's network loop reconnects by itself; each
# reconnect means the agent may have lost what it acknowledged last).
CONNECTS = [0]


def on_connect(client, userdata, flags, reason_code, properties):
    CONNECTS[0] += 1


def connect(host, port):
    while True:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.on_connect = on_connect
        try:
            c.connect(host, port, keepalive=10)
            c.loop_start()
            return c
        except OSError:
            time.sleep(0.2)


def main():
    host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    n, rate, base, period = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    c = connect(host, port)
    start = time.monotonic()
    i = 0
    reconnects = 0
    sent = 0
    seen = None
    while i < n:
        if seen is None and CONNECTS[0] > 0:
            seen = CONNECTS[0]
        if seen is not None and CONNECTS[0] > seen:
            # paho reconnected on its own: replay, as after a failed publish.
            seen = CONNECTS[0]
            reconnects += 1
            i = max(0, i - int(REPLAY * rate))
            start = time.monotonic() - i / rate
            print("reconnected by the client; replaying from %d" % i, flush=True)
        due = start + i / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        payload = '{"v": %s, "ts": %d}' % (value(i), base + i * period)
        ok = False
        sent += 1
        try:
            info = c.publish(topic, payload, qos=1)
            info.wait_for_publish(timeout=2.0)
            ok = info.is_published()
        except (RuntimeError, ValueError, OSError):
            ok = False
        if ok:
            i += 1
            continue
        try:
            c.loop_stop()
            c.disconnect()
        except Exception:
            pass
        c = connect(host, port)
        seen = None
        reconnects += 1
        back = int(REPLAY * rate)
        i = max(0, i - back)
        # Keep the pace from here.
        start = time.monotonic() - i / rate
        print("reconnected; replaying from %d" % i, flush=True)
    c.loop_stop()
    c.disconnect()
    print("done %d reconnects %d sent %d connects %d" % (n, reconnects, sent, CONNECTS[0]), flush=True)


if __name__ == "__main__":
    main()
