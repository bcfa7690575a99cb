"""Stop strings over text that arrives piece by piece, in time proportional to the new text.

A streamed answer must stop at the first stop string and must not send a prefix of one that may still complete.
Checking every prefix of every stop string against the text on every token costs the stop strings' length
squared per token (a client's four 100,000-character stop strings held the event loop for seconds). Here each
stop string is a Knuth-Morris-Pratt automaton: feeding a character costs O(1) amortised, and the automaton's state
*is* the length of the longest prefix of the stop string that ends the text so far, which is what must be held
back.
"""

from __future__ import annotations

from collections.abc import Sequence


def _failure(pattern: str) -> list[int]:
    """KMP's failure function: ``f[i]`` is the length of the longest proper prefix of ``pattern[: i + 1]`` that is
    also its suffix."""
    f = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = f[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        f[i] = k
    return f


class StopMatcher:
    """The first occurrence of any stop string in a text fed in pieces (``feed`` the whole text so far each time;
    only what is new is read)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._fail = [_failure(s) for s in self.stops]
        self._reset()

    def _reset(self) -> None:
        self._state = [0] * len(self.stops)
        self._text = ""
        self.cut: int | None = None  # where the text ends: the start of the first stop string found

    @property
    def hold(self) -> int:
        """Characters at the end of the text that may still begin a stop string (send them later, or never)."""
        return max(self._state, default=0)

    def feed(self, text: str) -> int | None:
        """Read what ``text`` adds to the text fed before; returns where the answer ends (the start of the first
        stop string) once one is found, else None. A text that is not an extension of the last (a decoder that
        revised its tail) is read again from the start."""
        if self.cut is not None:
            return self.cut
        if not text.startswith(self._text):
            self._reset()
        start = len(self._text)
        self._text = text
        for pos in range(start, len(text)):
            char = text[pos]
            for j, (stop, fail) in enumerate(zip(self.stops, self._fail)):
                k = self._state[j]
                while k and char != stop[k]:
                    k = fail[k - 1]
                if char == stop[k]:
                    k += 1
                if k == len(stop):
                    begin = pos + 1 - len(stop)
                    self.cut = begin if self.cut is None else min(self.cut, begin)
                    k = fail[k - 1]
                self._state[j] = k
            if self.cut is not None:
                # a longer stop that began earlier cannot complete later: the answer ends at this character
                return self.cut
        return None
