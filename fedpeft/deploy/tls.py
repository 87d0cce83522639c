"""TLS material and site authentication keys, made with ``cryptography`` (``fedpeft certs/keys``).

- :func:`make_tls_files`: a self-signed CA and a server certificate for the given host names
  and IP addresses (always also ``localhost`` and ``127.0.0.1``, which the coordinator's own
  ``flwr`` CLI uses), for ``flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``
  and ``flower-supernode --root-certificates``.
- :func:`make_node_keys`: an EC P-384 key pair in OpenSSH format, for
  ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register <pub>``.
- :func:`fingerprint`: ``SHA256:...`` of a public key, as ``ssh-keygen -lf KEY.pub`` prints it.

The CA is for a test deployment; a production federation may use certificates from the
hospital network's own CA instead (the same three files).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a loopback TLS setup."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    """OpenSSH-format key files of one SuperNode."""

    private_key: Path
    public_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _cert(subject: str, issuer: x509.Name, public_key, signing_key, *, ca: bool,
          days: int, hosts: list[str] | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(_san(hosts or []), critical=False).add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def make_tls_files(directory: Path, hosts: list[str] | None = None, days: int = 30) -> TlsFiles:
    """Write ``ca.crt``, ``server.pem`` and ``server.key`` (EC P-256) into ``directory``.

    Args:
        directory: Created if missing.
        hosts: Names and IP addresses sites use to reach the server (``localhost`` and
            ``127.0.0.1`` are always included).
        days: Validity of both certificates.

    Returns:
        The three paths. ``ca.crt`` goes to every site; ``server.key`` never leaves the server.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft deployment CA")])
    ca_cert = _cert("fedpeft deployment CA", ca_name, ca_key.public_key(), ca_key, ca=True, days=days)
    server_key = ec.generate_private_key(ec.SECP256R1())
    hosts = list(hosts or [])
    server_cert = _cert(hosts[0] if hosts else "localhost", ca_name, server_key.public_key(),
                        ca_key, ca=False, days=days, hosts=hosts)
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(_key_pem(server_key))
    files.server_key.chmod(0o600)
    return files


def make_node_keys(directory: Path, name: str) -> NodeKeys:
    """Write ``<name>`` (private) and ``<name>.pub`` (OpenSSH ECDSA P-384) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(directory / name, directory / f"{name}.pub")
    keys.private_key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    keys.private_key.chmod(0o600)
    keys.public_key.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return keys


def fingerprint(public_key: ec.EllipticCurvePublicKey | bytes) -> str:
    """``SHA256:<base64>`` of a public key (OpenSSH's format, as ``ssh-keygen -lf`` shows it).

    Args:
        public_key: A key object, or its OpenSSH (``ecdsa-sha2-...``) or PEM bytes.
    """
    if isinstance(public_key, bytes):
        text = public_key.strip()
        public_key = (serialization.load_ssh_public_key(text) if not text.startswith(b"-----")
                      else serialization.load_pem_public_key(text))
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    digest = hashlib.sha256(base64.b64decode(blob.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
