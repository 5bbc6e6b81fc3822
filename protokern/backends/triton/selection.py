"""Running selections of the ``k`` smallest, shared by the kernels that keep them in registers
(`nearest_prototypes`: over prototypes; `topk_distance`: over positions): `offer_bounds` and
`shortlist`, the expansion's bounds of a tile offered to each row's shortlist, and the direct
searches' `smallest_after` and `offer_pair`.

A row's kept entries are ``S`` slots: values, or ``(key, index)`` pairs ordered by key, then
index. A tile's entries are offered in that order, each taken once: `smallest_after` picks the
next one after the last offered, so nothing marks a taken entry. (Marking it by setting it to
``inf`` took the same column again when its value already was ``inf``, and column 0 again once a
tile had fewer columns than the count offered.)

Initial slots: an empty pair slot is ``(inf, EMPTY + slot)``, which every offered pair beats,
an infinite distance included; slots past the ``k`` kept are ``-inf`` (with index ``-1 -
slot``), never the largest, and are not results. Where ``inf`` means "no bound" rather than a
distance, the caller offers only finite entries (``valid``), and may number its empty slots
``-1 - slot`` instead, so as to keep its indices in 32 bits.
"""

import triton
import triton.language as tl

EMPTY = tl.constexpr(1 << 62)
"""The index of an empty slot (plus the slot): above every prototype's and position's."""

_BELOW_EVERY_INDEX = tl.constexpr(-(2**31))


@triton.jit
def smallest_after(keys, keys_at, valid, previous, previous_at, NONE: tl.constexpr):
    """Per row of ``keys`` ``(R, C)`` with indices ``keys_at`` (broadcastable to it, distinct
    within a row): the smallest ``(key, index)`` pair among the ``valid`` entries (a mask
    broadcastable to ``keys``) that come after ``(previous, previous_at)`` ``(R,)`` in (key,
    index) order; ``(inf, NONE)`` where there is none. NaN keys never come after anything:
    callers key NaN as ``-inf`` where it must be ranked."""
    after = valid & ((keys > previous[:, None])
                     | ((keys == previous[:, None]) & (keys_at > previous_at[:, None])))
    value = tl.min(tl.where(after, keys, float("inf")), axis=1)
    at = tl.min(tl.where(after & (keys == value[:, None]), keys_at, NONE), axis=1)
    return value, at


@triton.jit
def smallest_in_tile(tile, valid, previous, previous_at):
    """`smallest_after` over the columns of ``tile`` ``(R, C)``: column ``C`` where none."""
    column = tl.arange(0, tile.shape[1])[None, :]
    return smallest_after(tile, column, valid, previous, previous_at, tile.shape[1])


@triton.jit
def offer_value(keep, value, ok):
    """Offers ``value`` ``(R,)`` to ``keep`` ``(R, S)`` where ``ok``: it replaces the row's
    largest kept value (one slot of it) if smaller."""
    slot = tl.arange(0, keep.shape[1])[None, :]
    worst, worst_at = tl.max(keep, axis=1, return_indices=True,
                             return_indices_tie_break_left=True)
    replace = (slot == worst_at[:, None]) & (ok & (value < worst))[:, None]
    return tl.where(replace, value[:, None], keep)


@triton.jit
def offer_pair(keys, keys_at, value, at, ok):
    """Offers ``(value, at)`` ``(R,)`` to the pairs ``(keys, keys_at)`` ``(R, S)`` (distinct
    within a row) where ``ok``: it takes the slot of the row's largest pair, in (key, index)
    order, if below it. Returns the new ``keys``, ``keys_at`` and which slot it took ``(R, S)``,
    for the caller's payloads."""
    worst = tl.max(keys, axis=1)
    worst_at = tl.max(tl.where(keys == worst[:, None], keys_at, _BELOW_EVERY_INDEX), axis=1)
    better = ok & ((value < worst) | ((value == worst) & (at < worst_at)))
    taken = (keys == worst[:, None]) & (keys_at == worst_at[:, None]) & better[:, None]
    return (tl.where(taken, value[:, None], keys), tl.where(taken, at[:, None], keys_at),
            taken)


@triton.jit
def _count(valid, COUNT: tl.constexpr):
    """How many entries a row of ``valid`` ``(R, C)`` offers, at most ``COUNT``: the most of
    any row (a program's loop runs that many times, not ``COUNT``)."""
    return tl.minimum(tl.max(tl.sum(valid.to(tl.int32), axis=1), axis=0), COUNT)


@triton.jit
def offer_smallest_values(keep, tile, valid, COUNT: tl.constexpr):
    """Offers the ``COUNT`` smallest ``valid`` entries of each row of ``tile`` ``(R, C)`` to
    ``keep`` ``(R, S)`` (`offer_value`)."""
    previous = tl.full((tile.shape[0],), float("-inf"), tile.dtype)
    previous_at = tl.full((tile.shape[0],), -1, tl.int32)
    for _ in range(0, _count(valid, COUNT)):
        previous, previous_at = smallest_in_tile(tile, valid, previous, previous_at)
        keep = offer_value(keep, previous, previous_at < tile.shape[1])
    return keep


@triton.jit
def offer_smallest_pairs(keys, keys_at, tile, valid, first, COUNT: tl.constexpr):
    """Offers the ``COUNT`` smallest ``valid`` entries of each row of ``tile`` ``(R, C)``, as
    pairs ``(value, first + column)``, to ``(keys, keys_at)`` (`offer_pair`), smallest first,
    so that of equal values the lowest index is kept."""
    previous = tl.full((tile.shape[0],), float("-inf"), tile.dtype)
    previous_at = tl.full((tile.shape[0],), -1, tl.int32)
    for _ in range(0, _count(valid, COUNT)):
        previous, previous_at = smallest_in_tile(tile, valid, previous, previous_at)
        keys, keys_at, taken = offer_pair(keys, keys_at, previous,
                                          (first + previous_at).to(keys_at.dtype),
                                          previous_at < tile.shape[1])
    return keys, keys_at


@triton.jit
def offer_bounds(uppers, lowers, lowers_at, low, high, bounded, first, COUNT: tl.constexpr,
                 SLOTS: tl.constexpr):
    """One tile's bounds ``low <= true distance <= high`` ``(R, C)`` (meaningful where
    ``bounded``) offered to a row's shortlist: ``uppers`` ``(R, S)`` keeps the ``COUNT``
    smallest upper bounds (empty: ``inf``; slots past ``COUNT``: ``-inf``), whose largest is the
    threshold ``T``, and ``(lowers, lowers_at)`` the ``SLOTS`` smallest lower bounds at most
    ``T`` with their indices ``first + column`` (empty: ``(inf, -1 - slot)``). Returns the three.

    ``T`` only falls, so an upper bound not below the current ``T`` cannot enter, nor a lower
    bound above the ``T`` after this tile: neither is offered, and in most tiles past the
    first the loops run a few times, not ``COUNT`` and ``SLOTS``. Where the largest kept lower
    bound ends above ``T`` (`shortlist`), every entry whose lower bound is at most ``T``, and so
    each of the ``COUNT`` smallest true distances, is kept."""
    uppers = offer_smallest_values(uppers, high,
                                   bounded & (high < tl.max(uppers, axis=1)[:, None]), COUNT)
    threshold = tl.max(uppers, axis=1)
    lowers, lowers_at = offer_smallest_pairs(lowers, lowers_at, low,
                                             bounded & (low <= threshold[:, None]), first, SLOTS)
    return uppers, lowers, lowers_at


@triton.jit
def shortlist(uppers, lowers, decided):
    """After the last `offer_bounds`: which rows are certified ``(R,)`` (``decided``, and no
    entry at most ``T`` was dropped: the largest kept lower bound is above it) and which of
    their slots are candidates ``(R, S)`` (lower bound at most ``T``: at least ``COUNT``, which
    the caller recomputes directly)."""
    threshold = tl.max(uppers, axis=1)
    certified = decided & (tl.max(lowers, axis=1) > threshold)
    return certified, (lowers <= threshold[:, None]) & certified[:, None]


@triton.jit
def results(keys, keys_at, COUNT: tl.constexpr):
    """A search's pairs ``(R, S)`` for `store_first_k`: the slots past ``COUNT`` (``-inf``, to
    stay out of the running) become ``(inf, EMPTY + slot)``, after every kept pair, an
    infinite distance included."""
    slot = tl.arange(0, keys.shape[1])[None, :]
    return (tl.where(slot < COUNT, keys, float("inf")),
            tl.where(slot < COUNT, keys_at, slot.to(tl.int64) + EMPTY))


@triton.jit
def store_first_k(key, exact, at, values_ptr, indices_ptr, row, store, COUNT: tl.constexpr):
    """Stores, for each row, the ``COUNT`` smallest ``key`` ``(R, S)`` in order, ties to the
    lowest ``at``, as ``exact`` values (NaN where the key is -inf, the stand-in of NaN) and
    ``at`` indices (int64), at ``row * COUNT + j`` where ``store``. The pairs ``(key, at)`` are
    distinct within a row and taken in (key, index) order, infinite keys too: a row's first
    ``COUNT`` must be results."""
    # in (key, index) order, each pair once (a pair marked taken by setting its key to inf was
    # taken again where the key already was inf)
    smallest = tl.full((key.shape[0],), float("-inf"), key.dtype)
    index = tl.full((key.shape[0],), _BELOW_EVERY_INDEX, tl.int64)
    for j in range(0, COUNT):
        smallest, index = smallest_after(key, at.to(tl.int64), at == at, smallest, index,
                                         0x7FFFFFFFFFFFFFFF)
        chosen = (key == smallest[:, None]) & (at == index[:, None])
        value = tl.sum(tl.where(chosen, exact, 0.0), axis=1)
        value = tl.where(smallest == float("-inf"), float("nan"), value)
        out = row * COUNT + j
        tl.store(values_ptr + out, value.to(values_ptr.dtype.element_ty), mask=store)
        tl.store(indices_ptr + out, index, mask=store)


def slots_for(k: int) -> int:
    """Pairs kept per row to shortlist ``k``: the next power of two above ``k``."""
    return triton.next_power_of_2(k + 1)
