"""tokenmesh.inference.v2: the inference API, version 2, on the shared worker machinery."""
