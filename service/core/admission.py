"""Admission at the door: budgets that bound what the whole process holds, checked before work is spent on it.

Three budgets, each a capacity and what is in use (see ``Settings`` for the defaults and their arithmetic):

- ``requests``: detection requests in flight, one unit each, from arrival to answer (reading the body, waiting to
  decode, decoding, queued, running);
- ``body_bytes``: bytes of request bodies held in memory, reserved from ``Content-Length`` before the first body
  byte is read, or as the bytes arrive when the body is chunked;
- ``decode_pixels``: pixels (width × height, from the image header, read before decoding) of images admitted to
  decoding: waiting for a decode thread or decoding, and for ``/detect/annotated`` until the drawn image is sent.

What does not fit now is refused at once with :class:`~service.core.errors.Overloaded` (503 + ``Retry-After``). Every
budget is taken and given back on the event loop only (a decode thread's release is handed back to it), so no
lock is needed. Knows nothing of HTTP, images or models.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from service.core.errors import Overloaded

RETRY_AFTER_S = 1  # budgets free up as requests finish, within a request's time: retry soon, at another replica


@dataclass
class Budget:
    """One bounded resource: ``capacity`` units, ``in_use`` of them taken. ``observe(in_use)`` after each change."""

    name: str
    capacity: int
    observe: Callable[[int], None] = lambda in_use: None
    in_use: int = 0

    def take(self, amount: int, what: str) -> None:
        """Take ``amount`` units or raise :class:`Overloaded`; ``what`` names the request's need in the message."""
        if self.in_use + amount > self.capacity:
            raise Overloaded(
                f"the server is at its {self.name} budget ({self.in_use} of {self.capacity} in use; {what} needs "
                f"{amount}); retry in {RETRY_AFTER_S} s",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        self.in_use += amount
        self.observe(self.in_use)

    def give(self, amount: int) -> None:
        self.in_use -= amount
        self.observe(self.in_use)


@dataclass
class Reservation:
    """Units of one budget, given back when the last of its ``holders`` lets go (a decode thread that may outlive
    its request, and the request itself when it keeps the decoded pixels)."""

    budget: Budget
    amount: int
    holders: int = 1

    def release(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            self.budget.give(self.amount)


@dataclass
class Ticket:
    """What one admitted request holds; :meth:`close` gives back everything it still holds, once."""

    admission: Admission
    body_bytes: int = 0
    held: list[Reservation] = field(default_factory=list)
    closed: bool = False
    # One image of a request decodes at a time: a batch request never needs more than one image's pixels.
    decoding: asyncio.Lock = field(default_factory=asyncio.Lock)

    def hold_body(self, size: int) -> None:
        """Reserve ``size`` more bytes of body, or raise :class:`Overloaded`."""
        self.admission.body_bytes.take(size, "this body")
        self.body_bytes += size

    def reserve_pixels(self, pixels: int, held_by_request: bool) -> Reservation:
        """Reserve ``pixels`` of decode work (or raise :class:`Overloaded`). The caller releases it once when the
        decoding is over; with ``held_by_request``, the request holds it too, until :meth:`close`."""
        self.admission.decode_pixels.take(pixels, "this image")
        reservation = Reservation(self.admission.decode_pixels, pixels, holders=2 if held_by_request else 1)
        if held_by_request:
            self.held.append(reservation)
        return reservation

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.admission.body_bytes.give(self.body_bytes)
        for reservation in self.held:
            reservation.release()
        self.admission.requests.give(1)


class Admission:
    """The process's budgets. ``observe(budget_name, in_use)`` is called after every change (for gauges)."""

    def __init__(
        self,
        max_requests: int,
        max_body_bytes: int,
        max_decode_pixels: int,
        observe: Callable[[str, int], None] = lambda name, in_use: None,
    ) -> None:
        def budget(name: str, capacity: int) -> Budget:
            return Budget(name, capacity, lambda in_use: observe(name, in_use))

        self.requests = budget("requests", max_requests)
        self.body_bytes = budget("body_bytes", max_body_bytes)
        self.decode_pixels = budget("decode_pixels", max_decode_pixels)

    @property
    def budgets(self) -> tuple[Budget, ...]:
        return self.requests, self.body_bytes, self.decode_pixels

    def admit(self) -> Ticket:
        """A ticket for one more request in flight, or :class:`Overloaded`. Close it when the request is answered."""
        self.requests.take(1, "this request")
        return Ticket(self)
