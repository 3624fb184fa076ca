"""Control protocol shared by source and target: framing (length-prefixed protobuf) and auth.

This package and ``phaul/transport`` sit below both ``phaul/source`` and ``phaul/target`` (the
layout card names only the four top-level roles; the shared layers live here so that neither
side imports the other).
"""
