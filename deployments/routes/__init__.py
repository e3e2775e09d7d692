"""The Ingress' HTTP routes, one APIRouter per concern (deployments/ingress.py composes them).

- rank: POST /rank and POST /events, the hot path;
- health: GET /healthz and GET /model;
- admin: POST /admin/rollback, GET /admin/trainer, GET /admin/sink;
- experiments: GET /experiments, PUT / DELETE /admin/experiments/{name}, GET /experiments/{name}/report;
- common: what they share (the replica dependency, API key scheme, error bodies, response docs,
  the body size middleware and the 422 handler).

A route function reaches the Ingress replica that serves the request through the `Replica`
dependency (Serve's replica context: what Serve itself injects as `self` into class routes).
"""
