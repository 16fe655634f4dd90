"""A local CA and a certificate for ``localhost`` and ``127.0.0.1``, made with the two
``openssl`` commands the README gives (section "TLS, and Codex logged in with ChatGPT")."""

from __future__ import annotations

import shlex
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

COMMANDS = (
    "openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj /CN=codexlb-local-CA"
    " -keyout ca.key -out ca.pem"
    " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
    "openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj /CN=localhost"
    " -CA ca.pem -CAkey ca.key -keyout server.key -out server.pem"
    " -addext subjectAltName=DNS:localhost,IP:127.0.0.1"
    " -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth",
)


@dataclass(frozen=True)
class LocalTls:
    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def openssl_missing() -> str | None:
    """Why the certificate cannot be made here, or None."""
    return None if shutil.which("openssl") else "TLS tests need the openssl command"


def make_local_tls(directory: Path) -> LocalTls:
    directory.mkdir(parents=True, exist_ok=True)
    for command in COMMANDS:
        subprocess.run(
            shlex.split(command), cwd=directory, check=True, capture_output=True, timeout=60
        )
    return LocalTls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
