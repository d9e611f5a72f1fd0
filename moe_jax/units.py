"""How numbers are written for people: one formatter per unit, shared by the CLI and the reports."""

from __future__ import annotations


def gb(n) -> str:
    """Bytes as GB (decimal), 'n/a' for None."""
    return "n/a" if n is None else f"{n / 1e9:,.2f} GB"


def mb(n) -> str:
    """Bytes as MB (decimal)."""
    return f"{n / 1e6:,.1f} MB"


def human_bytes(n: float) -> str:
    """Bytes in the largest unit (GB, MB, kB, B) that keeps the number at least 1."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def ms(s) -> str:
    """Seconds as ms below 10 s, else as s; 'n/a' for None."""
    return "n/a" if s is None else (f"{s * 1e3:,.3f} ms" if s < 10 else f"{s:,.2f} s")
