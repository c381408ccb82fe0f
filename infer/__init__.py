"""Inference front ends: the `m1jax generate` command, the request-batching engine and the HTTP server."""
