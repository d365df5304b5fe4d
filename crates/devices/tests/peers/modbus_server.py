#!/usr/bin/env python3
"""A pymodbus server with a datastore of known values, for the Modbus driver
tests and the polling benchmark (crates/devices/tests/modbus_*.rs,
crates/devices/examples/modbus_poll_bench.rs).

Usage:
  modbus_server.py tcp [--port N] [--ports K] [--delay-ms N] [--quiet]
  modbus_server.py rtu --serial PATH [--baud N] [--delay-ms N] [--quiet]

Protocol with the test, on stdout, one line each, flushed:
  PORT <n>                  once per listening TCP port, when it accepts
  READY <path>              (rtu) once the serial port is open
  REQ fc=<f> unit=<u> addr=<a> count=<c>
                            each request received (not with --quiet)
  VALUES <table> <addr> <v>...  the answer to a `get` command
Commands on stdin, one a line:
  get <hr|ir|co|di> <addr> <count>   print the datastore's current values
  delay <ms>                         delay every later response by ms

The datastore (request addresses, zero-based; anything past the end of a
table is an illegal address):
  holding registers 0..99 (see HOLDING below), input registers 0..19,
  coils 0..15, discrete inputs 0..15.
--delay-ms delays every response (a slow device); see install_async_delay.
Needs pymodbus >= 3.8 (trace_pdu); written against 3.16.
"""

import argparse
import asyncio
import struct
import sys
import threading
import time

import pymodbus
from pymodbus.datastore import ModbusSequentialDataBlock, ModbusServerContext

try:  # pymodbus >= 3.10
    from pymodbus.datastore import ModbusDeviceContext as DeviceContext
except ImportError:  # pragma: no cover - older 3.x
    from pymodbus.datastore import ModbusSlaveContext as DeviceContext


def f32_words(x, little_words=False, little_bytes=False):
    raw = struct.pack(">f", x)
    words = [raw[0:2], raw[2:4]]
    if little_bytes:
        words = [w[::-1] for w in words]
    if little_words:
        words = words[::-1]
    return [int.from_bytes(w, "big") for w in words]


def f64_words(x):
    raw = struct.pack(">d", x)
    return [int.from_bytes(raw[i:i + 2], "big") for i in range(0, 8, 2)]


def u32_words(x):
    x &= 0xFFFFFFFF
    return [x >> 16, x & 0xFFFF]


def str_words(s, count):
    raw = s.encode().ljust(count * 2, b"\0")
    return [int.from_bytes(raw[i:i + 2], "big") for i in range(0, count * 2, 2)]


# Holding registers, by address.
HOLDING = {
    0: [1234],                                   # uint16 1234
    1: [(-5) & 0xFFFF],                          # int16 -5
    2: u32_words(-100000),                       # int32 -100000, high word first
    4: u32_words(3000000000),                    # uint32 3e9
    6: f32_words(10.0),                          # float32 10.0, big word order  [0x4120, 0x0000]
    8: f32_words(10.0, little_words=True),       # float32 10.0, little word order [0x0000, 0x4120]
    10: [0],                                     # uint16, written by tests
    11: [0, 0],                                  # float32, written by tests
    13: f64_words(123.456),                      # float64 123.456
    17: str_words("HELLO", 4),                   # string, 4 registers
    21: [215],                                   # uint16 215: scale 0.1 offset -5 -> 16.5
    22: f32_words(12.5, little_words=True, little_bytes=True),  # float32 12.5, both orders little
    24: [0, 0],                                  # int32, written by tests
    26: [0, 0, 0, 0],                            # float64, written by tests
    30: [0xFFFF, 0xFFFF],                        # uint32 max
    32: [0x7FC0, 0x0000],                        # float32 NaN
    34: str_words("", 2)[:1] + [0xC328],         # invalid UTF-8 ("\0\0" then 0xC3 0x28)
}
HOLDING_LEN = 100
INPUT = {0: [250], 1: f32_words(21.5), 3: [7]}
INPUT_LEN = 20
COILS = [True, False, True, True, False, False, False, False,
         False, False, False, False, False, False, False, True]
DISCRETE = [False, True, False, False, False, False, False, False,
            False, False, False, False, False, False, False, False]


def table(spec, length):
    regs = [0] * length
    for addr, words in spec.items():
        regs[addr:addr + len(words)] = words
    return regs


def build_context():
    # Block address 1 = request address 0 in every pymodbus 3.x.
    device = DeviceContext(
        di=ModbusSequentialDataBlock(1, list(DISCRETE)),
        co=ModbusSequentialDataBlock(1, list(COILS)),
        hr=ModbusSequentialDataBlock(1, table(HOLDING, HOLDING_LEN)),
        ir=ModbusSequentialDataBlock(1, table(INPUT, INPUT_LEN)),
    )
    return ModbusServerContext(device, single=True)


FC_OF_TABLE = {"co": 1, "di": 2, "hr": 3, "ir": 4}


class Behaviour:
    def __init__(self, delay_ms, quiet):
        self.delay_ms = delay_ms
        self.quiet = quiet
        self.async_delay = False

    def trace_pdu(self, sending, pdu):
        if not sending:
            if not self.quiet:
                count = (getattr(pdu, "count", 0) or len(getattr(pdu, "registers", None) or [])
                         or len(getattr(pdu, "bits", None) or []))
                print(f"REQ fc={pdu.function_code} unit={pdu.dev_id} addr={pdu.address} count={count}",
                      flush=True)
        elif self.delay_ms > 0 and not self.async_delay:
            time.sleep(self.delay_ms / 1000.0)
        return pdu

    def install_async_delay(self):
        """Delays in the request handler with asyncio.sleep, so a slow
        answer on one connection does not stall the others (a reconnecting
        client is served at once). Falls back to blocking in trace_pdu when
        this pymodbus has no async handle_request."""
        try:
            from pymodbus.server.requesthandler import ServerRequestHandler
        except ImportError:  # pragma: no cover - other 3.x layouts
            return
        original = getattr(ServerRequestHandler, "handle_request", None)
        if original is None or not asyncio.iscoroutinefunction(original):
            return
        behaviour = self

        async def handle_request(handler):
            if behaviour.delay_ms > 0:
                await asyncio.sleep(behaviour.delay_ms / 1000.0)
            await original(handler)

        ServerRequestHandler.handle_request = handle_request
        self.async_delay = True


async def get_values(server, context, table_name, addr, count):
    fc = FC_OF_TABLE[table_name]
    if hasattr(server, "async_getValues"):
        return await server.async_getValues(0, fc, addr, count)
    return context[0].getValues(fc, addr, count)  # pragma: no cover - older 3.x


def stdin_commands(loop, servers, context, behaviour):
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        try:
            if parts[0] == "get":
                t, addr, count = parts[1], int(parts[2]), int(parts[3])
                fut = asyncio.run_coroutine_threadsafe(get_values(servers[0], context, t, addr, count), loop)
                values = [int(v) for v in fut.result(5)]
                print("VALUES", t, addr, *values, flush=True)
            elif parts[0] == "delay":
                behaviour.delay_ms = int(parts[1])
                print("OK delay", behaviour.delay_ms, flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print("ERROR", repr(exc), flush=True)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["tcp", "rtu"])
    ap.add_argument("--port", type=int, default=0, help="first TCP port (0: any free one)")
    ap.add_argument("--ports", type=int, default=1, help="number of TCP servers (ports), sharing the datastore")
    ap.add_argument("--serial", default="")
    ap.add_argument("--baud", type=int, default=115200)
    ap.add_argument("--delay-ms", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="do not log requests")
    args = ap.parse_args()

    from pymodbus.server import ModbusSerialServer, ModbusTcpServer
    from pymodbus.framer import FramerType

    behaviour = Behaviour(args.delay_ms, args.quiet)
    behaviour.install_async_delay()
    context = build_context()
    servers = []
    if args.mode == "tcp":
        for i in range(args.ports):
            port = args.port + i if args.port else 0
            server = ModbusTcpServer(context, address=("127.0.0.1", port), trace_pdu=behaviour.trace_pdu)
            await server.serve_forever(background=True)
            sock = server.transport.sockets[0]
            print("PORT", sock.getsockname()[1], flush=True)
            servers.append(server)
    else:
        server = ModbusSerialServer(context, framer=FramerType.RTU, port=args.serial, baudrate=args.baud,
                                    trace_pdu=behaviour.trace_pdu)
        await server.serve_forever(background=True)
        print("READY", args.serial, flush=True)
        servers.append(server)
    loop = asyncio.get_running_loop()
    threading.Thread(target=stdin_commands, args=(loop, servers, context, behaviour), daemon=True).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
