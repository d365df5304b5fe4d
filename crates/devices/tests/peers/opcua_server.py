#!/usr/bin/env python3
"""OPC UA test peer for crates/devices/tests/opcua_client.rs (python asyncua).

Serves variables of several types under ns=2 (string node ids, `ns=2;s=<Name>`):

  read only : SByte Byte Int16 UInt16 Int32 UInt32 Int64 UInt64 Float Double
              Bool String Bytes ReadOnlyInt Counter (Int32, +1 every 100 ms)
              Uncertain (Double whose status is UncertainLastUsableValue)
  writable  : SetpointDouble (Double) ModeInt32 (Int32) LabelString (String)
              FlagBool (Boolean) SmallByte (Byte)

Usage: opcua_server.py [--port N] [--user NAME --password PW] [--secure DIR]

--port 0 (default) picks a free port. When the server listens it prints
`READY <port>` on stdout. Every change of a writable variable (however it was
written) is printed as `CHANGED <Name> <repr(value)>`, so a test can check
what the server itself sees. With --user, anonymous sessions are refused and
only that user/password is accepted. With --secure DIR, the server also offers
Basic256Sha256 Sign and SignAndEncrypt endpoints, with a self-signed
certificate kept in DIR.
"""

import argparse
import asyncio
import logging
import socket
import sys
from pathlib import Path

try:
    from asyncua import Server, ua
    from asyncua.crypto.permission_rules import User, UserRole
    from asyncua.server.user_managers import UserManager
except ImportError as e:  # the Rust test turns this into SKIP or a failure
    print(f"MISSING asyncua: {e}", flush=True)
    sys.exit(3)


class OneUser(UserManager):
    def __init__(self, name, password):
        self.name = name
        self.password = password

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username == self.name and password == self.password:
            return User(role=UserRole.User, name=username)
        return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


READ_ONLY = [
    ("SByte", -8, ua.VariantType.SByte),
    ("Byte", 200, ua.VariantType.Byte),
    ("Int16", -1234, ua.VariantType.Int16),
    ("UInt16", 54321, ua.VariantType.UInt16),
    ("Int32", -123456, ua.VariantType.Int32),
    ("UInt32", 4000000000, ua.VariantType.UInt32),
    ("Int64", -9000000000, ua.VariantType.Int64),
    ("UInt64", 9000000000, ua.VariantType.UInt64),
    ("Float", 1.5, ua.VariantType.Float),
    ("Double", 2.25, ua.VariantType.Double),
    ("Bool", True, ua.VariantType.Boolean),
    ("String", "hello", ua.VariantType.String),
    ("Bytes", b"\x01\x02\xff", ua.VariantType.ByteString),
    ("ReadOnlyInt", 7, ua.VariantType.Int32),
]

WRITABLE = [
    ("SetpointDouble", 20.5, ua.VariantType.Double),
    ("ModeInt32", 1, ua.VariantType.Int32),
    ("LabelString", "idle", ua.VariantType.String),
    ("FlagBool", False, ua.VariantType.Boolean),
    ("SmallByte", 3, ua.VariantType.Byte),
]


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--user")
    ap.add_argument("--password", default="")
    ap.add_argument("--secure", help="directory for the server's certificate and key")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)

    port = args.port or free_port()
    user_manager = OneUser(args.user, args.password) if args.user else None
    server = Server(user_manager=user_manager)
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/yunbian/")
    server.set_server_name("Yunbian test peer")

    policies = [ua.SecurityPolicyType.NoSecurity]
    if args.secure:
        from asyncua.crypto.cert_gen import setup_self_signed_certificate
        from cryptography.x509.oid import ExtendedKeyUsageOID

        d = Path(args.secure)
        d.mkdir(parents=True, exist_ok=True)
        key, cert = d / "server-key.pem", d / "server-cert.der"
        await setup_self_signed_certificate(
            key,
            cert,
            "urn:yunbian:test:opcua-server",
            "127.0.0.1",
            [ExtendedKeyUsageOID.SERVER_AUTH],
            {"countryName": "CN", "organizationName": "Yunbian", "commonName": "opcua-test-peer"},
        )
        await server.set_application_uri("urn:yunbian:test:opcua-server")
        await server.load_certificate(str(cert))
        await server.load_private_key(str(key))
        policies += [
            ua.SecurityPolicyType.Basic256Sha256_Sign,
            ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
        ]
    server.set_security_policy(policies)
    if args.user:
        server.set_identity_tokens([ua.UserNameIdentityToken])
    else:
        server.set_identity_tokens([ua.AnonymousIdentityToken, ua.UserNameIdentityToken])

    idx = await server.register_namespace("urn:yunbian:test")
    assert idx == 2, idx
    dev = await server.nodes.objects.add_object(ua.NodeId("Device", idx), "Device")

    async def var(name, value, vt):
        return await dev.add_variable(ua.NodeId(name, idx), name, ua.Variant(value, vt))

    for name, value, vt in READ_ONLY:
        await var(name, value, vt)
    counter = await var("Counter", 0, ua.VariantType.Int32)
    uncertain = await var("Uncertain", 9.5, ua.VariantType.Double)
    await uncertain.write_value(
        ua.DataValue(ua.Variant(9.5, ua.VariantType.Double), StatusCode=ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue))
    )
    writable = {}
    for name, value, vt in WRITABLE:
        node = await var(name, value, vt)
        await node.set_writable()
        writable[name] = (node, value)

    async with server:
        print(f"READY {port}", flush=True)
        n = 0
        while True:
            await asyncio.sleep(0.1)
            n += 1
            await counter.write_value(ua.Variant(n, ua.VariantType.Int32))
            for name, (node, last) in list(writable.items()):
                v = await node.read_value()
                if v != last:
                    print(f"CHANGED {name} {v!r}", flush=True)
                    writable[name] = (node, v)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
