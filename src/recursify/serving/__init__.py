"""Serving: continuous (depth-wise) batching with early exits; see ``recursify.serve.Engine``."""
