"""Key material of one cluster, made with openssl once and kept in the state directory.

- ca.crt/ca.key: a private CA; the kubeconfig trusts it, so clients verify the API server (no insecure TLS).
- apiserver.crt/.key: serving certificate for 127.0.0.1/localhost and the in-cluster names.
- sa.key/sa.pub: service-account token signing pair (TokenRequest; the API server verifies with sa.pub).
- tokens.csv: static bearer tokens (the admin token, group system:masters).
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
from pathlib import Path

SERVING_NAMES = (
    "IP:127.0.0.1",
    "DNS:localhost",
    "IP:10.0.0.1",  # first address of --service-cluster-ip-range: the `kubernetes` service
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
)


class CertError(RuntimeError):
    pass


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise CertError(f"`openssl {shlex.join(args)}` failed in {cwd}: {out.stderr.strip()}\n"
                        "  what to do: install openssl (`python -m localcluster provision` does) or delete "
                        f"{cwd} to regenerate the keys")


def ensure_certs(certs: Path) -> None:
    """Create whatever of the CA, serving pair and service-account pair is missing."""
    certs.mkdir(parents=True, exist_ok=True)
    certs.chmod(0o700)
    if not (certs / "ca.crt").exists():
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650",
                 "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=localcluster-ca",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=certs)
        (certs / "apiserver.crt").unlink(missing_ok=True)  # a new CA invalidates the old serving cert
    if not (certs / "apiserver.crt").exists():
        (certs / "serving.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage=serverAuth\nsubjectAltName={','.join(SERVING_NAMES)}\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
                 "-subj", "/CN=kube-apiserver", cwd=certs)
        _openssl("x509", "-req", "-sha256", "-days", "3650", "-in", "apiserver.csr", "-CA", "ca.crt",
                 "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "serving.ext", "-out", "apiserver.crt", cwd=certs)
    if not (certs / "sa.pub").exists():
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=certs)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=certs)
    for key in certs.glob("*.key"):
        key.chmod(0o600)


def ensure_serving_pair(certs: Path, name: str, names: tuple[str, ...] = ("IP:127.0.0.1", "DNS:localhost")) -> None:
    """<name>.crt/.key: a serving certificate from the cluster's CA, for a local server the API server calls
    (an admission webhook); ensure_certs must have run."""
    if (certs / f"{name}.crt").exists():
        return
    (certs / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={','.join(names)}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=certs)
    _openssl("x509", "-req", "-sha256", "-days", "3650", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=certs)
    (certs / f"{name}.key").chmod(0o600)


def ensure_admin_token(tokens_csv: Path) -> str:
    """The admin token (created once); the file is the API server's --token-auth-file."""
    if not tokens_csv.exists():
        fd = os.open(tokens_csv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{secrets.token_hex(24)},admin,admin,system:masters\n")
    for line in tokens_csv.read_text().splitlines():
        fields = line.split(",")
        if len(fields) >= 2 and fields[1] == "admin":
            return fields[0]
    raise CertError(f"{tokens_csv} has no line for user 'admin'; delete it to create a new admin token")
