"""The consumer's HTTP gateway: the Open Inference Protocol (KServe v2, as Triton speaks
it, binary tensor data extension included) in front of one attested enclave.

``python -m drm_consumer gateway --address HOST --policy policy.toml`` serves
``http://127.0.0.1:8000/v2/...``; a program written for Triton or KServe changes only its
URL. :mod:`~drm_consumer.gateway.v2` parses and renders the protocol's tensors (sans-IO),
:mod:`~drm_consumer.gateway.pool` keeps the attested connections,
:mod:`~drm_consumer.gateway.app` is the ASGI app that maps the enclave's answers to HTTP,
and :mod:`~drm_consumer.gateway.command` is the command line.
"""

from __future__ import annotations
