"""kiln's server: a model repository served over the KServe v2 gRPC protocol (Open Inference Protocol) with
dynamic batching, and over HTTP (KServe v2 REST, OpenAI's embeddings API) from the same batchers.

    python -m server --repository engines --port 8001 --http-port 8000

or from Python (inside a running event loop):

    server, port = create_server(ServerConfig(repository="engines", port=0))
    await server.start()
    ...
    await server.stop()

The server sees engines only through optimize's runtime (`optimize.runtime.load`, specs, `run`).
"""

from server.app import Server, create_server
from server.batch_policy import BatchPolicy, QueuePolicy
from server.batcher import Batch, Batcher
from server.config import ModelConfig, ServerConfig
from server.errors import ServerError
from server.repository import Model, Repository

__all__ = [
    "Batch",
    "BatchPolicy",
    "Batcher",
    "Model",
    "ModelConfig",
    "QueuePolicy",
    "Repository",
    "Server",
    "ServerConfig",
    "ServerError",
    "create_server",
]
