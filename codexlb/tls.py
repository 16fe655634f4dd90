"""Listening with TLS (``[server] tls_cert``, ``tls_key``; SPEC S13).

The Codex TUI logged in with ChatGPT requires an ``https`` workspace origin
(``accounts/check``), so codexlb can serve HTTPS and WSS itself. The certificate chain and key
are PEM files, read once at start (a change needs a restart). The README shows how to make a
local CA and a certificate for ``localhost`` that Codex trusts through
``CODEX_CA_CERTIFICATE``.
"""

from __future__ import annotations

import ssl

from codexlb.config import ConfigError, ServerConfig


def server_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The TLS context to listen with, or ``None`` for plain HTTP; ``ConfigError`` naming the
    setting when the files cannot be used."""
    if server.tls_cert is None or server.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except FileNotFoundError as exc:
        raise ConfigError(f"[server] tls_cert / tls_key: file not found: {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"[server] tls_cert / tls_key: cannot load the certificate and key: {exc}"
        ) from None
    return context


def scheme(server: ServerConfig) -> str:
    """``https`` when the server listens with TLS, else ``http``."""
    return "https" if server.tls_cert is not None else "http"
