"""The parent's side of failed-login penalties with ``[server] processes = N``.

The one :class:`~pop3sf.throttle.Penalties` table and :class:`~pop3sf.throttle.VerificationGate`
of the whole fleet (docs/architecture.md §8). Children send every wrong password here
(``fail GROUP DIGEST``), and ask for a turn (``req ID GROUP``) only for groups with a penalty
mark; the gate answers ``go ID`` or ``no ID WHY``, a child gives its place back with ``fin ID``
or ``cancel ID GROUP``. The in-flight caps count what the gate runs plus what children started
on their own (:class:`~pop3sf.shared.GroupCounts` ``verifying``).
"""

from __future__ import annotations

from .channel import Channel
from .config import AuthSection
from .loop import EventLoop
from .shared import SharedState
from .throttle import Penalties, VerificationGate

Key = tuple[int, str]   # (child pid, the child's id of the attempt)


class Gatekeeper:
    """Penalties and the gate for every child; see the module docstring."""

    def __init__(self, auth: AuthSection, loop: EventLoop, shared: SharedState) -> None:
        self.auth = auth
        self.shared = shared
        self.penalties = Penalties(auth.penalty_initial, auth.penalty_max, auth.penalty_decay,
                                   auth.penalty_table_size)
        self.penalties._key = shared.penalty_key
        self.gate = VerificationGate(self.penalties, loop, self._refusal)
        #: (pid, id) -> the one key object the gate knows it by (it compares keys by
        #: identity), from ``req`` until ``fin``, ``cancel`` or ``no``.
        self.keys: dict[Key, Key] = {}
        #: Groups with a penalty mark -> their mark's slot (cleared once unpenalised).
        self.marked: dict[str, int] = {}

    def handle(self, pid: int, channel: Channel, words: list[str]) -> bool:
        """A child's gate message (False: not one); IndexError/ValueError if malformed."""
        kind = words[0]
        if kind == "req":
            key, group = (pid, words[1]), words[2]
            self.keys[key] = key

            def refuse(why: str) -> None:
                self.keys.pop(key, None)
                channel.send("no", key[1], why)

            self.gate.request(key, group, lambda: channel.send("go", key[1]), refuse)
        elif kind == "fin":
            known = self.keys.pop((pid, words[1]), None)
            if known is not None:
                self.gate.finished(known)
        elif kind == "cancel":
            known = self.keys.pop((pid, words[1]), None)
            if known is not None:
                self.gate.cancel(known, words[2])
        elif kind == "fail":
            group = words[1]
            self.penalties.record_digest(group, bytes.fromhex(words[2]))
            marks = self.shared.marks
            marks.mark(group)               # the child did already; a restart may not have
            self.marked[group] = marks.slot(group)
        else:
            return False
        return True

    def _refusal(self, group: str) -> str | None:
        """The caps that span processes; each child checks its own (stuck calls, stopping)."""
        auth, verifying = self.auth, self.shared.verifying
        if self.gate.total + verifying.grand_total() >= auth.max_auth_in_flight:
            return "too many authentications in flight"
        if self.gate.running[group] + verifying.total(group) \
                >= auth.max_auth_in_flight_per_address:
            return "too many authentications in flight from this address"
        return None

    def forget(self, pid: int) -> None:
        """The child *pid* is gone: give back its places at the gate, so its verifications in
        flight don't hold their group's turn forever."""
        gate = self.gate
        for group, queue in list(gate.waiting.items()):
            for waiter in list(queue):
                if isinstance(waiter.key, tuple) and waiter.key[0] == pid:
                    gate.cancel(waiter.key, group)
        for key in [k for k in gate._holders if isinstance(k, tuple) and k[0] == pid]:
            gate.finished(key)
        for key in [k for k in self.keys if k[0] == pid]:
            del self.keys[key]

    def unmark(self) -> None:
        """Clear the marks of groups whose penalty decayed (a slot shared with a group still
        penalised stays marked). Called every second."""
        done = [g for g in self.marked if not self.penalties.penalized(g)]
        if not done:
            return
        slots = {self.marked.pop(g) for g in done}
        slots -= set(self.marked.values())
        for slot in slots:
            self.shared.marks.unmark(slot)

    def reload(self, auth: AuthSection) -> None:
        self.auth = auth
        self.penalties.initial, self.penalties.maximum = auth.penalty_initial, auth.penalty_max
        self.penalties.decay, self.penalties.size = auth.penalty_decay, auth.penalty_table_size
