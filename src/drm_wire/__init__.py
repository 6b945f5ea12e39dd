"""Length-prefixed msgpack protocol, tensors, TLS and attestation shared by all programs."""

from __future__ import annotations
