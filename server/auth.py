"""The bearer-token check, one copy for the gRPC interceptor (`server.app`) and the HTTP front
end (`server.http.app`)."""

from __future__ import annotations

import hmac


def bearer_token_matches(header: str | bytes, token: bytes) -> bool:
    """True when `header`, the value of an `authorization` header or metadata entry, is
    `Bearer <token>` (the scheme in any case). The token is compared in constant time."""
    text = header.decode(errors="replace") if isinstance(header, bytes) else str(header)
    scheme, _, credential = text.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), token)
