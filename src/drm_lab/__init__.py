"""The lab: the project's programs as real processes on loopback, for tests, benches, demo.

Nothing here runs in production, and no daemon imports it (``tests/test_layout.py``
checks); it is installed with the project so that ``tests/``, ``bench/`` and ``demo/``
share one harness instead of importing each other.

* :mod:`drm_lab.processes`: start a program, wait for what it logs, capture its output,
  stop it; one-shot commands.
* :mod:`drm_lab.transcript`: the demo's shell, which shows each command as a user would
  type it before running it through :mod:`drm_lab.processes`.
* :mod:`drm_lab.admin`: the custodian's admin API, as an operator's script calls it.
* :mod:`drm_lab.deployment`: the operator's steps and the daemons of one deployment.
* :mod:`drm_lab.faults`: a loopback TCP proxy that partitions or throttles a link.
* :mod:`drm_lab.models`: deterministic ONNX models. It needs ``onnx``, which is in the
  ``test``, ``bench`` and ``demo`` dependency groups, not in the runtime dependencies;
  nothing else here imports it.
* :mod:`drm_lab.certs`: throwaway certificates for TLS tests and baselines.
* :mod:`drm_lab.fleet`: many light in-process enclave links against one real custodian
  (the scale bench's machinery), and the bare-TLS echo floor it is compared with.
* :mod:`drm_lab.pccs`: a PCS/PCCS on loopback written to Intel's API, serving a given
  collateral bundle (the PCCS client's tests, and the cold-fetch bench).
"""

from __future__ import annotations
