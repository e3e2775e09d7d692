"""Thin Ray Serve deployments over the `rerank` core library; the app builder is app.py."""
