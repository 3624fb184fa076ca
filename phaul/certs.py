"""``phaul certs``: a small private CA and host certificates for mutual TLS.

``phaul certs ca --out DIR`` writes ``ca.pem`` and ``ca.key``; ``phaul certs host NAME --ca DIR
--out DIR [--ip A]... [--dns N]...`` writes ``NAME.pem`` and ``NAME.key`` signed by that CA. A
host certificate is valid for both TLS roles (server and client auth), so the same pair serves an
agent (``--tls-cert/--tls-key``) and a source (``phaul migrate --tls-cert/--tls-key``). Keys are
EC P-256 and written with mode 0600; the CA key never leaves the directory it was made in.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from phaul.errors import UsageError

CA_DAYS = 3650
HOST_DAYS = 825


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o644)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(out: Path, name: str = "phaul CA") -> CertPair:
    """Create ``out/ca.pem`` and ``out/ca.key`` (refuses to overwrite an existing CA)."""
    out.mkdir(parents=True, exist_ok=True)
    pair = CertPair(out / "ca.pem", out / "ca.key")
    if pair.key.exists() or pair.cert.exists():
        raise UsageError(f"{out} already holds a CA: use another --out directory")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(pair.key, key)
    _write_cert(pair.cert, cert)
    return pair


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the CA from {ca_dir} (ca.pem, ca.key): {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"{ca_dir}/ca.key is not an EC key made by `phaul certs ca`")
    return cert, key


def make_host(
    name: str,
    ca_dir: Path,
    out: Path,
    ips: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    days: int = HOST_DAYS,
) -> CertPair:
    """Create ``out/NAME.pem`` + ``out/NAME.key`` signed by the CA in ``ca_dir``.

    The certificate names ``name`` (as DNS name unless it is an IP address), every ``ips`` and
    ``dns`` entry, and allows both server and client authentication. Raises UsageError.
    """
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"bad certificate name {name!r}")
    ca_cert, ca_key = load_ca(ca_dir)
    sans: list[x509.GeneralName] = []
    try:
        addrs = [ipaddress.ip_address(a) for a in ips]
    except ValueError as err:
        raise UsageError(f"--ip: {err}") from err
    try:
        addrs.insert(0, ipaddress.ip_address(name))
    except ValueError:
        sans.append(x509.DNSName(name))
    sans += [x509.DNSName(d) for d in dns if d != name]
    sans += [x509.IPAddress(a) for a in dict.fromkeys(addrs)]
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    pair = CertPair(out / f"{name}.pem", out / f"{name}.key")
    _write_key(pair.key, key)
    _write_cert(pair.cert, cert)
    return pair


def cmd_certs(args: argparse.Namespace) -> int:
    if args.certs_command == "ca":
        pair = make_ca(Path(args.out))
        print(f"CA certificate {pair.cert}, key {pair.key} (keep the key private)")
    elif args.certs_command == "host":
        pair = make_host(args.name, Path(args.ca), Path(args.out), tuple(args.ip), tuple(args.dns))
        print(f"certificate {pair.cert}, key {pair.key}")
    else:
        raise UsageError("phaul certs: give `ca` or `host`")
    return 0
