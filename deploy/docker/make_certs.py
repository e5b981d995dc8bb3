"""Make a private CA and TLS certificates for a dask cluster (scheduler/workers and clients).

    python deploy/docker/make_certs.py CERT_DIR [HOSTNAME ...]

Writes ca.pem, node.pem/node-key.pem (scheduler and workers; valid for the given host names,
127.0.0.1 and localhost) and client.pem/client-key.pem. Keep the keys secret; mount them
read-only (compose, Kubernetes secret) and point dask's TLS settings at them.
"""

from __future__ import annotations

import datetime
import ipaddress
import sys
from pathlib import Path


def make_certs(directory, hosts=("scheduler", "localhost")) -> dict[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k, path):
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        path.chmod(0o600)

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nbdask test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths = {"ca": str(out / "ca.pem")}
    names = [x509.DNSName(h) for h in hosts] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for role, usage in (("node", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                        ("client", [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH])):
        k = key()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"nbdask {role}")]))
                .issuer_name(ca_name).public_key(k.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=365))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
                .sign(ca_key, hashes.SHA256()))
        (out / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(k, out / f"{role}-key.pem")
        paths[role] = str(out / f"{role}.pem")
        paths[f"{role}_key"] = str(out / f"{role}-key.pem")
    return paths


if __name__ == "__main__":
    print(make_certs(sys.argv[1], tuple(sys.argv[2:]) or ("scheduler", "localhost")))
