"""The phases of a migration, shared by the source and the target.

A migration moves forward through these phases; ``ALLOWED`` lists every legal transition. The
target rejects a control message that does not belong to its current phase. What each phase
guarantees is written next to it: that is the contract rollback relies on.
"""

from __future__ import annotations

import enum

from phaul.errors import ProtocolError


class Phase(enum.Enum):
    # Transport up; versions and authentication being exchanged. Nothing exists on either side.
    HANDSHAKE = "handshake"
    # Checks on both ends. Nothing has been changed anywhere; failing here changes nothing.
    PREFLIGHT = "preflight"
    # The tree runs on the source; its memory is being copied to the target's page store. The
    # target holds only images; aborting deletes them.
    PRECOPY = "precopy"
    # CRIU has frozen the tree on the source (network locked) and writes its images to the
    # target. The source can resume unchanged; the target holds only images.
    DUMP = "dump"
    # The target restores the tree from the images and holds it at CRIU's pre-resume point: it has
    # not executed a single instruction. Addresses are on the target. Rollback kills the restored
    # tree (it never ran) and resumes the source. With a lazy restore the target resumes the tree
    # on the source's "commit" but stays in this phase until its lazy-pages daemon has filled
    # all memory: a daemon failure still rolls back (the source is still frozen).
    RESTORE = "restore"
    # The source has said "commit" and the tree runs on the target with all its memory. From
    # here the target copy is the one; the source is killed once the target confirms.
    COMMIT = "commit"
    # Terminal: the tree runs on the target, the source is gone, leftovers are cleaned.
    DONE = "done"
    # Terminal: the tree runs on the source, unchanged; the target has nothing left.
    ROLLED_BACK = "rolled-back"


ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.HANDSHAKE: frozenset({Phase.PREFLIGHT, Phase.ROLLED_BACK}),
    Phase.PREFLIGHT: frozenset({Phase.PRECOPY, Phase.DUMP, Phase.ROLLED_BACK}),
    Phase.PRECOPY: frozenset({Phase.DUMP, Phase.ROLLED_BACK}),
    Phase.DUMP: frozenset({Phase.RESTORE, Phase.ROLLED_BACK}),
    Phase.RESTORE: frozenset({Phase.COMMIT, Phase.ROLLED_BACK}),
    Phase.COMMIT: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
    Phase.ROLLED_BACK: frozenset(),
}


class PhaseMachine:
    """Holds the current phase and refuses transitions not listed in ``ALLOWED``."""

    def __init__(self, start: Phase = Phase.HANDSHAKE) -> None:
        self.phase = start
        self.history: list[Phase] = [start]

    def advance(self, to: Phase) -> None:
        if to not in ALLOWED[self.phase]:
            raise ProtocolError(f"cannot go from phase {self.phase.value} to {to.value}")
        self.phase = to
        self.history.append(to)

    def require(self, *phases: Phase) -> None:
        if self.phase not in phases:
            names = ", ".join(p.value for p in phases)
            raise ProtocolError(f"not allowed in phase {self.phase.value} (expected {names})")

    @property
    def terminal(self) -> bool:
        return not ALLOWED[self.phase]
