"""Page streams: CRIU's page-server protocol and the target-side page store.

- :mod:`phaul.page_server.criu_image`: CRIU pagemap/pages/pstree image files.
- :mod:`phaul.page_server.criu_protocol`: the ``page_server_iov`` codec (``PS_IOV_*``).
- :mod:`phaul.page_server.store`: :class:`CriuPageReceiver`, which plays CRIU's page server for a
  ``criu dump --page-server`` and writes a restorable image directory.
"""

from phaul.page_server.store import CriuPageReceiver, FlatPageImage, PageStream, ReceiveStats

__all__ = ["CriuPageReceiver", "FlatPageImage", "PageStream", "ReceiveStats"]
