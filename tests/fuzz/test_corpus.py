"""Every fuzz finding stays found: its reproducer replayed through its harness, no atheris.

``tests/fuzz/corpus/<harness>/`` holds one file per input that once escaped a harness
(each named for what it is); the harness must now return normally on it. The seeds each
harness starts from are replayed too, so a seed cannot rot into a finding unnoticed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest

from drm_wire import messages as m
from drm_wire.protocol import Link, Side, State

from .targets import HARNESSES, SCENARIOS, STOPPING_SCENARIOS, _stopping, _wire, sample_messages

CORPUS: Final = Path(__file__).parent / "corpus"
REPRODUCERS: Final = sorted(path for path in CORPUS.glob("*/*") if path.is_file())


@pytest.mark.parametrize(
    "path", REPRODUCERS, ids=[f"{path.parent.name}/{path.name}" for path in REPRODUCERS]
)
def test_reproducer_no_longer_escapes(path: Path) -> None:
    HARNESSES[path.parent.name].run(path.read_bytes())


def test_every_corpus_directory_names_a_harness() -> None:
    assert REPRODUCERS
    assert {path.parent.name for path in REPRODUCERS} <= set(HARNESSES)


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_seeds_pass_their_harness(name: str) -> None:
    harness = HARNESSES[name]
    seeds = list(harness.seeds())
    assert seeds
    for seed in seeds:
        harness.run(seed)


def test_the_seeds_hold_every_message_type() -> None:
    assert {type(message) for message in sample_messages()} == set(m.MESSAGE_TYPES.values())


def test_the_connection_harness_reaches_every_state_of_both_roles_of_both_links() -> None:
    for link in Link:
        for side in Side:
            states = {state for (lk, sd, state) in SCENARIOS if (lk, sd) == (link, side)}
            assert {"await_hello", "await_welcome", "open", "closed", "broken"} <= states
    custodian = {state for (link, _side, state) in SCENARIOS if link is Link.CUSTODIAN}
    assert "receiving_model" in custodian


def test_the_stopping_harness_reaches_stopping_on_both_sides_and_takes_a_crossing_grant() -> None:
    for side, recall in STOPPING_SCENARIOS:
        enclave, custodian = _stopping(recall)
        assert enclave.state is custodian.state is State.STOPPING
        if side is Side.CLIENT:  # a grant the custodian sent before it read the stop
            grant = m.Grant(grant_id=7, units=2, granted_total=9)
            enclave.receive_data(_wire(grant))
            assert enclave.next_message() == grant
            assert enclave.state is State.STOPPING
