"""What the custodian and the enclave both need to know about a model, in one place.

* :mod:`.scan`: the bounded walk over a model's protobuf bytes (external data, operator
  domains) and the split of its weights for loading;
* :mod:`.signature`: a model's inputs and outputs as the enclave serves them (wire dtype,
  dims, ``None`` for a dynamic dim), read from an onnxruntime session;
* :mod:`.terms`: the owner's lending terms (what one inference is, the shapes a request
  may have), their parsing from TOML and from the wire, their resolution against the
  model's inputs, and the check and cost of a request under them.

Why here, in ``drm_wire``: the custodian must refuse a model or terms the enclave would
refuse, with the same code, and must not import the enclave daemon; the enclave must run
this code inside its measurement. ``drm_wire`` is the one package both already import, and
it is measured as part of the enclave (``MEASURED_PACKAGES``) and installed with it, so
sharing costs no new package to measure, install or trust. Everything here is pure: no
I/O, no trio, and no import of onnxruntime (:mod:`.signature` reads the session objects
it is handed), so the consumer can use the terms too without loading a runtime.
"""
