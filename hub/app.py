"""The Quart-Trio application: the route modules of hub/routes/, wired to what each uses."""

from __future__ import annotations

from collections.abc import Callable

from hypercorn.typing import WebsocketScope
from quart_trio import QuartTrio

from hub.access import Access
from hub.admission import Admission
from hub.deps import ConnectionDeps
from hub.routes import hooks, logs, ops, redact, tasks, verify, viewer, ws
from hub.ws.endpoint import WS_PATH, AdmittedSocket, WebSocketEndpoint


def create_app(deps: ConnectionDeps, store_available: Callable[[], bool]) -> QuartTrio:
    """The hub's app. `deps` is what the routes and each Connection use;
    `store_available` answers /healthz (the writer is committing)."""
    config = deps.config
    app = QuartTrio("keruta-hub")
    # No redirect of `//` to `/`: /api/v1/tasks//logs would be task "logs"'s.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = config.limits.max_frame_bytes
    # An admitted request's body must have arrived within this (408).
    app.config["BODY_TIMEOUT"] = config.body_timeout
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    access = Access.for_config(config)
    # A request that may carry a body proves its token before any of it is read;
    # the WebSocket is served below Quart, on hypercorn's ASGI messages.
    app.asgi_app = Admission(  # type: ignore[method-assign]
        app.asgi_app, access, deps.metrics, {WS_PATH: WebSocketEndpoint(access, deps)},
        budget=deps.ingest_budget, max_body=config.limits.max_frame_bytes, post_timeout=config.post_timeout,
    )
    hooks.install(app, access=access, metrics=deps.metrics, max_frame_bytes=config.limits.max_frame_bytes)
    app.register_blueprint(logs.blueprint(
        access=access, store=deps.store, writer_inbox=deps.writer_inbox, limiter=deps.limiter, config=config,
        broadcaster=deps.broadcaster,
    ))
    app.register_blueprint(tasks.blueprint(access=access, store=deps.store))
    app.register_blueprint(verify.blueprint(access=access, store=deps.store))
    app.register_blueprint(redact.blueprint(access=access, store=deps.store, broadcaster=deps.broadcaster))
    app.register_blueprint(ops.blueprint(
        access=access, metrics=deps.metrics, store_available=store_available, max_page_size=config.max_page_size,
    ))
    app.register_blueprint(viewer.blueprint())
    app.register_blueprint(ws.blueprint())
    return app


def served_websockets(app: QuartTrio) -> dict[str, Callable[[WebsocketScope, AdmittedSocket], object]]:
    """The WebSocket endpoints of `app` by path, for hub/listener.py to serve
    on its own route (a handshake it does not take reaches them through Admission)."""
    admission = app.asgi_app
    assert isinstance(admission, Admission)
    return {path: ep.serve for path, ep in admission.websockets.items() if isinstance(ep, WebSocketEndpoint)}
