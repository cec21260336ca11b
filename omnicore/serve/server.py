"""Running the server: bind the socket first (a taken port is a one-line error), then serve with uvicorn while the
model loads in the background."""

from __future__ import annotations

import logging
import socket
import sys
import threading

from ..errors import OmnicoreError
from .app import ServeOptions, Service, create_app


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OmnicoreError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted. Prints ``listening on URL`` once bound and ``ready`` once the model is warm; a model
    that fails to load stops the server with an OmnicoreError."""
    import uvicorn

    sock = bind(host, port)
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(levelname)s: %(message)s")
    service = Service(options)
    app = create_app(options, service)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, access_log=False)
    server = uvicorn.Server(config)

    def failed(message: str) -> None:
        server.should_exit = True

    def loaded() -> None:
        service.load()
        if service.status == "ready":
            print(f"omni serve: ready: model {service.name} at http://{shown}:{actual}/", flush=True)

    service.on_failure = failed
    print(f"omni serve: listening on http://{shown}:{actual}/ (loading {options.model_dir})", flush=True)
    threading.Thread(target=loaded, name="omni-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        service.stop()
        sock.close()
    if service.status == "failed":
        raise OmnicoreError(f"--model {options.model_dir}: {service.error}")
    sys.stdout.flush()
