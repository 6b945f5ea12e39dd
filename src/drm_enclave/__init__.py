"""The borrower's daemon: holds the model in enclave memory and enforces the quota."""

from __future__ import annotations
