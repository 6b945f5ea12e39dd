"""Remote attestation: SGX DCAP quotes, RA-TLS certificates, policies."""

from __future__ import annotations
