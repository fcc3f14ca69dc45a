"""Command-line value types shared by the `vidq` commands."""
from __future__ import annotations

import math

import click

UNSET = "unset"  # a limit option not given (None means "remove it")


class Limit(click.ParamType):
    """A finite non-negative number (of credits), or a whole one (of videos);
    with `removable`, also `none` to remove the cap. NaN and inf are refused:
    a cap compared against NaN never stops anything."""

    def __init__(self, *, whole: bool = False, removable: bool = True):
        self.whole, self.removable = whole, removable
        self.name = ("N" if whole else "X") + ("|none" if removable else "")

    def convert(self, value, param, ctx):
        if value is None or value == UNSET:
            return value
        if self.removable and str(value).strip().lower() == "none":
            return None
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not (math.isfinite(number) and number >= 0) or (self.whole and number % 1):
            what = "whole number" if self.whole else "number"
            self.fail(f"{value!r} is not a non-negative {what}"
                      + (" or 'none'" if self.removable else ""), param, ctx)
        return int(number) if self.whole else number
