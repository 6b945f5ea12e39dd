"""The trio and pyOpenSSL half of drm_wire: TLS stream, RA-TLS contexts, message channel.

The channel is :mod:`~drm_wire.net.channel` (what the daemons use: typed messages, a
reader task, a locked writer), with :mod:`~drm_wire.net.channel_errors` (how it ends) and
:mod:`~drm_wire.net.request_channel` (the consumer client's requests on top).
"""

from __future__ import annotations
