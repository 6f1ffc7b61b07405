"""The hub's HTTP surface, one module per resource; hub/app.py wires them.

    common.py   ApiError, json_response, query-parameter parsing, task_json
    access.py   who may do what: tokens, Origin and Host checks
    hooks.py    before/after-request hooks and the errors-as-JSON handlers
    logs.py     /api/v1/tasks/<id>/logs (POST, GET, stats, raw, DELETE)
    tasks.py    /api/v1/tasks, /api/v1/tasks/<id>
    ws.py       /api/v1/ws: refusals, then one hub.ws.connection.Connection
    viewer.py   the web viewer's page and static files
    ops.py      /healthz, /metrics, /openapi.json

Each route module exports `blueprint(...)`, taking only what its routes use.
"""
