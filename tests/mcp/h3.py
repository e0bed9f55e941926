"""HTTP/3 over QUIC with aioquic (from PyPI), for the real-software tests.

    h3.py server HOST PORT DIR   # serves "hello over h3" to every GET; cert written to DIR
    h3.py client HOST PORT DIR   # GET / with DIR's certificate as the trust root; prints
                                 # the status and body, or "error: ..." and exits 1

The client sends from a UDP socket of its own (aioquic: unconnected, dual-stack).
"""

import asyncio
import datetime
import ipaddress
import os
import sys

from aioquic.asyncio import connect, serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_cert(directory, host):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mcpg-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


class Server(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)

    def quic_event_received(self, event: QuicEvent):
        for e in self.h3.handle_event(event):
            if isinstance(e, HeadersReceived) and e.stream_ended:
                body = b"hello over h3"
                self.h3.send_headers(
                    e.stream_id,
                    [(b":status", b"200"), (b"content-length", str(len(body)).encode())],
                )
                self.h3.send_data(e.stream_id, body, end_stream=True)
        self.transmit()


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.done = asyncio.get_event_loop().create_future()
        self.status = None
        self.body = b""

    def quic_event_received(self, event: QuicEvent):
        for e in self.h3.handle_event(event):
            if isinstance(e, HeadersReceived):
                self.status = dict(e.headers).get(b":status", b"").decode()
            if isinstance(e, DataReceived):
                self.body += e.data
            if getattr(e, "stream_ended", False) and not self.done.done():
                self.done.set_result(None)

    async def get(self, authority):
        stream = self._quic.get_next_available_stream_id()
        self.h3.send_headers(
            stream,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", b"/"),
            ],
            end_stream=True,
        )
        self.transmit()
        await asyncio.wait_for(self.done, 5)


async def main():
    mode, host, port, directory = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if mode == "server":
        cert, key = make_cert(directory, host)
        config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
        config.load_cert_chain(cert, key)
        await serve(host, port, configuration=config, create_protocol=Server)
        open(os.path.join(directory, "ready"), "w").close()
        await asyncio.Future()
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.load_verify_locations(os.path.join(directory, "cert.pem"))
    config.server_name = host
    try:
        async with connect(host, port, configuration=config, create_protocol=Client,
                           wait_connected=True) as c:
            await c.get(f"{host}:{port}")
            print(f"{c.status} {c.body.decode()}")
    except Exception as e:  # the test reads what the client saw
        print(f"error: {type(e).__name__}: {e}")
        sys.exit(1)


if sys.argv[1] == "client":
    try:
        asyncio.run(asyncio.wait_for(main(), 8))
    except TimeoutError:
        # aioquic sends from an unconnected dual-stack socket and ignores send errors:
        # a refused destination looks like silence to it.
        print("error: no answer within 8 s")
        sys.exit(1)
else:
    asyncio.run(main())
