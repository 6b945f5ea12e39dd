"""The end user's client: verifies the enclave, sends inputs, reads predictions."""

from __future__ import annotations
