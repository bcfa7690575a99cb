"""Test-only literal versions of the methods: their formulas as loops, row by row and head by head.

Each method names its literal version in its ``literal`` declaration; the tests compare the fast path with
these loops and ``seeright bench`` times them. Nothing that serves requests imports this package."""
