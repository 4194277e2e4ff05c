"""Which target serves a request: the weighted (optionally sticky) arm first, then the order to fall back in."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Mapping, Sequence

from gateway.compiled import Route, Target
from gateway.exchange import Exchange

_SPAN = float(1 << 64)


def stable_draw(route: str, principal: str) -> float:
    """A number in [0, 1) fixed by route and principal, the same in every process and on every host."""
    digest = hashlib.blake2b(f"{route}\0{principal}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SPAN


def draw_for(route: Route, ex: Exchange) -> float:
    sticky = route.config.sticky
    if sticky == "user" and ex.user:
        return stable_draw(route.name, ex.user)
    if sticky == "key" and ex.key_id:
        return stable_draw(route.name, ex.key_id)
    return random.random()


def choose(targets: Sequence[Target], draw: float) -> int:
    """Index of the target that `draw` (in [0, 1)) lands on, each taking a share equal to its weight; -1 if all are 0."""
    total = 0.0
    for target in targets:
        total += target.weight
    if total <= 0:
        return -1
    point = draw * total
    last = -1
    for index, target in enumerate(targets):
        if target.weight <= 0:
            continue
        last = index
        point -= target.weight
        if point < 0:
            return index
    return last


def _ordered(route: Route, draw: float) -> Iterator[Target]:
    first = choose(route.targets, draw)
    if first < 0:
        return
    yield route.targets[first]
    for index, target in enumerate(route.targets):
        if index != first and target.weight > 0:
            yield target


def attempt_order(route: Route, routes: Mapping[str, Route], draw: float) -> Iterator[tuple[Route, Target]]:
    """The chosen arm, the route's other live targets, then each fallback route's targets (one level, no cycles).

    Drained targets (weight 0) are never tried. Each target comes with the route whose retry and breaker settings
    apply to it.
    """
    for target in _ordered(route, draw):
        yield route, target
    for name in route.config.fallbacks:
        fallback = routes.get(name)
        if fallback is not None:
            for target in _ordered(fallback, draw):
                yield fallback, target
