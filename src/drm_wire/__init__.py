"""Length-prefixed msgpack protocol, tensors, TLS and attestation shared by all programs.

What only a daemon or a command line needs to run (configuration files, logging, systemd
notifications) lives in :mod:`drm_daemon`, not here. The bounded LRU cache (:mod:`._lru`)
stays: its users are the attestation caches (the PCK chain cache in
:mod:`.attestation._pck` and the RA-TLS verification cache in :mod:`.net.ratls_context`),
which are part of verifying a peer.
"""

from __future__ import annotations
