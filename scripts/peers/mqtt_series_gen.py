"""Many-series MQTT load for the agent benchmarks (scripts/bench-agent-series.sh):
publishes one reading per series every PERIOD seconds, paced, QoS 0, with
paho-mqtt, to topics PREFIX/<i> for the series i of this shard.

A reading is {"v": <value>, "ts": <Unix ms>}: a sensor-like value (a level
per series plus a slow random walk, 0.1 resolution), timestamped when sent.
Run several shards (--shard K --shards N) for more throughput: series i
belongs to shard i % N.

Prints "sent N in S s (R/s), late L" at the end (L: ticks that started more
than one period behind schedule, i.e. the generator could not keep up).

usage: mqtt_series_gen.py HOST PORT --series 10000 --period 1.0 --seconds 300
                          [--prefix gen] [--shard 0 --shards 1]
"""

import argparse
import random
import time

import paho.mqtt.client as mqtt


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--series", type=int, default=10000)
    p.add_argument("--period", type=float, default=1.0, help="seconds between readings of one series")
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--prefix", default="gen")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    a = p.parse_args()

    mine = [i for i in range(a.series) if i % a.shards == a.shard]
    topics = ["%s/%d" % (a.prefix, i) for i in mine]
    rng = random.Random(a.shard)
    value = [round(15.0 + 20.0 * rng.random(), 1) for _ in mine]

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.max_queued_messages_set(0)
    c.connect(a.host, a.port, keepalive=30)
    c.loop_start()

    # Each series is sent once per period, spread over the period in slices
    # of 10 ms so the load is smooth rather than one burst per period.
    slices = max(1, int(a.period / 0.01))
    per_slice = [list(range(k, len(mine), slices)) for k in range(slices)]
    start = time.monotonic()
    end = start + a.seconds
    sent = 0
    late = 0
    tick = 0
    while True:
        due = start + tick * a.period / slices
        now = time.monotonic()
        if due >= end:
            break
        if due > now:
            time.sleep(due - now)
        elif now - due > a.period:
            late += 1
        ts = int(time.time() * 1000)
        for j in per_slice[tick % slices]:
            v = value[j] + rng.choice((-0.1, 0.0, 0.0, 0.0, 0.1))
            v = round(min(max(v, 0.0), 50.0), 1)
            value[j] = v
            c.publish(topics[j], '{"v": %.1f, "ts": %d}' % (v, ts), qos=0)
            sent += 1
        tick += 1
    took = time.monotonic() - start
    c.loop_stop()
    c.disconnect()
    print("sent %d in %.1f s (%.0f/s), late %d" % (sent, took, sent / took, late), flush=True)


if __name__ == "__main__":
    main()
