"""The outgoing client over real TLS on loopback: an https function goes through the same Agent,
pool and connection protocol as plain http, wrapped in Twisted's TLS.

No broker or Redis needed: a twisted.web server with a certificate made here, for ``localhost``."""

from __future__ import annotations

import datetime

import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.web import resource, server
from twisted.web.client import BrowserLikePolicyForHTTPS

from txfaas.http.client import BytesProducer, function_agent
from txfaas.http.pool import quiet_pool


def certificate_for_localhost() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class Echo(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        body = request.content.read()
        request.setHeader(b"x-method", request.method)
        request.setHeader(b"x-client-port", b"%d" % request.getClientAddress().port)
        if request.path == b"/chunked":
            request.write(b"part one, ")
            request.write(body)
            request.finish()
            return server.NOT_DONE_YET
        return b"echo: " + body


@pytest_twisted.ensureDeferred
async def test_https_requests_go_through_the_pool_over_tls_and_reuse_the_connection():
    cert_pem, key_pem = certificate_for_localhost()
    server_cert = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
    port = reactor.listenSSL(0, server.Site(Echo()), server_cert.options(), interface="127.0.0.1")
    pool = quiet_pool(reactor, per_host=2)
    try:
        trust = ssl.Certificate.loadPEM(cert_pem)
        client = function_agent(reactor, pool, BrowserLikePolicyForHTTPS(trustRoot=trust))
        base = f"https://localhost:{port.getHost().port}".encode()
        ports = set()
        for n in range(3):
            response = await client.request(b"POST", base + b"/echo", _headers(), BytesProducer(b"%d" % n))
            assert (response.code, await treq.content(response)) == (200, b"echo: %d" % n)
            assert response.headers.getRawHeaders(b"x-method") == [b"POST"]
            ports.update(response.headers.getRawHeaders(b"x-client-port"))
        response = await client.request(b"PUT", base + b"/chunked", _headers(), BytesProducer(b"two"))
        assert await treq.content(response) == b"part one, two"
        ports.update(response.headers.getRawHeaders(b"x-client-port"))
        assert len(ports) == 1  # four calls in turn, one TLS connection kept and used again
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_untrusted_certificate_fails_the_request():
    cert_pem, key_pem = certificate_for_localhost()
    server_cert = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
    port = reactor.listenSSL(0, server.Site(Echo()), server_cert.options(), interface="127.0.0.1")
    pool = quiet_pool(reactor)
    try:
        client = function_agent(reactor, pool)  # system roots only
        url = f"https://localhost:{port.getHost().port}/echo".encode()
        try:
            await client.request(b"GET", url, _headers(), None)
        except Exception as e:  # ResponseNeverReceived([SSL error]) or the like
            assert "certificate" in repr(e).lower() or "ssl" in repr(e).lower(), repr(e)
        else:
            raise AssertionError("a self-signed certificate was trusted")
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()


def _headers():
    from twisted.web.http_headers import Headers

    return Headers()
