"""Expected failures: bad input, unusable files, results that are not numbers.

:class:`JaxinterpError` is an expected failure whose message names the file or option
and the cause; the command line prints it (exit status 2) without a traceback
(``--debug`` shows one). Library errors that predate it stay what they were
(``ValueError`` subclasses such as ``DataError``, ``SweepError``, ``ConversionError``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np


class JaxinterpError(Exception):
    """An expected failure; the message names what to fix."""


class NotFiniteError(JaxinterpError, ArithmeticError):
    """A computed result is NaN or infinite (a silent wrong number otherwise)."""


def require_finite(values: Mapping[str, Any], what: str) -> None:
    """Raise :class:`NotFiniteError` naming every entry of ``values`` (name -> number or
    array) that holds NaN or infinity. ``what`` says where the numbers come from."""
    bad = []
    for name, value in values.items():
        if value is None:  # not computed
            continue
        a = np.asarray(value, dtype=float)
        finite = np.isfinite(a)
        if not finite.all():
            shown = a.reshape(-1)[~finite.reshape(-1)][:3].tolist()
            count = f"{int((~finite).sum())} of {a.size} values " if a.size > 1 else ""
            bad.append(f"{name} ({count}{', '.join(map(_fmt, shown))})")
    if bad:
        raise NotFiniteError(f"{what}: not finite: {'; '.join(bad)}. The model's outputs hold NaN or infinity "
                             f"(e.g. a NaN or overflowing weight, or bfloat16 overflow); no result is written")


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf") if math.isinf(x) else f"{x:g}"
