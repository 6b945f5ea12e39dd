"""The trio and pyOpenSSL half of drm_wire: TLS stream, RA-TLS contexts, message channel."""

from __future__ import annotations
