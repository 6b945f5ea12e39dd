"""What the daemons and command lines share to run as services, apart from the protocol.

* :mod:`.collector`: the garbage collector set for a daemon holding many long-lived links;
* :mod:`.config_file`: the ``serve`` commands' TOML configuration files (flags win);
* :mod:`.logs`: structured logging, with secrets redacted and control characters escaped;
* :mod:`.sd_notify`: systemd's readiness, status and watchdog notifications.

None of it is part of the wire protocol: :mod:`drm_wire` never imports this package.
"""

from __future__ import annotations
