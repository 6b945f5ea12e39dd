"""The model owner's daemon: verifies enclaves, lends the model, meters every inference."""

from __future__ import annotations
