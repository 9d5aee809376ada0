"""File I/O: the container seam (``container``), safetensors reading and writing (``safetensors``) and
the page-cache-bypassing byte streams of a merge (``stream``)."""
