"""An OpenAI-compatible HTTP gateway over the Redis queue (``helix gateway``).

Stateless: each HTTP request becomes ordinary queue entries (docs/protocol.md) that any daemon
serving the model picks up, and the gateway follows their result streams with
``AsyncHelixClient``. Any number of replicas can run against one Redis.

Modules: ``config`` (GatewayConfig), ``app`` (the FastAPI app: ``create_app``), ``service``
(one request end to end), ``schemas`` and ``translate`` (OpenAI to Helix and back), ``routes``
(model to queue), ``follow`` (a request's queue entries), ``streaming`` (SSE, disconnects),
``middleware``, ``metrics``, ``errors``, ``run`` (uvicorn). Nothing is imported here, so that
``helix`` loads FastAPI only for ``helix gateway``.
"""
