"""The HTTP/JSON gateway: REST routes transcoded to the mesh's gRPC services.

Routes come from the ``google.api.http`` rules in the protos (``rules``), JSON
from protobuf's canonical mapping (``transcode``); calls follow the cluster map
like the typed client (``upstream``); streams are Server-Sent Events (``sse``);
``app`` puts it together as a Starlette application and ``__main__`` serves it
with uvicorn (``python -m gateway``).
"""
