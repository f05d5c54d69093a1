"""The HTTP port: KServe v2 REST and OpenAI's embeddings API over the same service, batchers
and statistics as the gRPC port (see server/README.md, "HTTP")."""

from server.http.app import HttpServer, create_app

__all__ = ["HttpServer", "create_app"]
