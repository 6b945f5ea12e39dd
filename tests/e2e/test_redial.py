"""A refused enclave costs its custodian a trickle of connections, between real processes.

A second enclave process on a license the first one holds is refused after its hello
(``duplicate_instance``). Before, a refusal after the hello reset the redial delay, and
such an enclave was attested hundreds of times in half a minute; now every refusal grows
it (exponential, to a minute), and the enclave says at error level why and what to do.
"""

from __future__ import annotations

from drm_lab.deployment import Lab
from drm_lab.models import tiny_model

#: Refusals watched: their delays are 0.1-0.2, 0.2-0.4, 0.4-0.8 and 0.8-1.6 s.
REFUSALS = 5


def test_a_refused_enclave_redials_ever_more_slowly(lab: Lab) -> None:
    tiny = lab.write_model("tiny", tiny_model())
    custodian = lab.start_custodian([tiny], initial=4, lease=2)
    lab.start_enclave(lab.custodian_port)
    second = lab.start_enclave(lab.custodian_port, link_up=False)

    second.daemon.wait_for("custodian_refused", failures=REFUSALS)
    refused = second.daemon.find_all("custodian_refused")
    assert [e["failures"] for e in refused] == list(range(1, REFUSALS + 1))
    assert {e["level"] for e in refused} == {"error"}
    assert {e["reason"] for e in refused} == {"license_in_use"}
    delays = [float(e["retry_in"]) for e in refused]
    assert delays == sorted(delays), delays
    assert delays[-1] >= 0.1 * 2**REFUSALS / 2 - 0.05  # jittered in [c/2, c], rounded
    # The custodian saw exactly those attempts, not a storm (its log is read by a thread
    # of its own: wait until the refusals the enclave logged are in it too).
    after = 0
    for _ in range(REFUSALS):
        hit = custodian.wait_for(
            "enclave_duplicate_instance", after=after, instance=second.instance_id
        )
        after = 1 + custodian.events.index(hit)
    seen = custodian.find_all("enclave_duplicate_instance", instance=second.instance_id)
    assert REFUSALS <= len(seen) <= REFUSALS + 1
