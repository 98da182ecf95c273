"""The two files ``recursify export --format transformers`` copies next to the weights (``trust_remote_code``).

They define thin transformers classes over the installed recursify: no copy of the decoder travels
with a checkpoint, so an export opens only where recursify is installed.
"""
