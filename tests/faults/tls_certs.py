"""Throwaway certificates for TLS tests, made with the openssl CLI (no Python crypto package needed).

`make_ca(dir, name)` makes a self-signed CA; `issue(ca, dir, name, cn, server=...)` a leaf certificate
signed by it: a server certificate names ``localhost`` and ``127.0.0.1`` (subjectAltName), a client
certificate carries `cn` as its common name (the user name under SASL EXTERNAL). Keys are EC P-256
(fast to make), unencrypted unless `password` is given; everything is valid for two days.
`available()` tells whether the openssl CLI is there.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its PEM private key."""
    cert: Path
    key: Path


def openssl() -> str | None:
    return shutil.which("openssl")


def available() -> bool:
    return openssl() is not None


def _run(*args: str, cwd: Path) -> None:
    result = subprocess.run([openssl() or "openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def make_ca(directory: Path, name: str = "mqfed-test-ca") -> KeyPair:
    """A self-signed CA (`<name>.pem`, `<name>.key`) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = KeyPair(directory / f"{name}.pem", directory / f"{name}.key")
    _run("req", "-x509", *_EC, "-nodes", "-keyout", str(ca.key), "-out", str(ca.cert), "-days", DAYS,
         "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return ca


def issue(ca: KeyPair, directory: Path, name: str, cn: str, *, server: bool = False,
          password: str | None = None) -> KeyPair:
    """A certificate for `cn` signed by `ca` (`<name>.pem`, `<name>.key` in `directory`): for a server
    (serverAuth, SAN DNS:localhost and IP:127.0.0.1) or a client (clientAuth). `password` encrypts the key."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}.key")
    csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
    key_args = ["-passout", f"pass:{password}"] if password else ["-nodes"]
    _run("req", "-new", *_EC, *key_args, "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={cn}",
         cwd=directory)
    ext.write_text("basicConstraints = critical,CA:FALSE\n"
                   "keyUsage = critical,digitalSignature\n"
                   "subjectKeyIdentifier = hash\n"
                   "authorityKeyIdentifier = keyid\n"
                   + ("extendedKeyUsage = serverAuth\nsubjectAltName = DNS:localhost,IP:127.0.0.1\n" if server
                      else "extendedKeyUsage = clientAuth\n"))
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
         "-out", str(pair.cert), "-days", DAYS, "-extfile", str(ext), cwd=directory)
    csr.unlink()
    ext.unlink()
    return pair
