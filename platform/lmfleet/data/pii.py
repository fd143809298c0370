"""Personal data in documents: e-mail addresses, IP addresses and phone numbers, found by pattern.

The data stage's `pii` setting masks each match (`<email>`, `<ip>`, `<phone>`), drops the documents that
hold any (quarantined with reason `pii`), or leaves them (`off`, the default); counts per kind either way
go to the report. Patterns, and what they let through on purpose:
- e-mail: local part @ dotted domain with a 2-24 letter top-level label (RFC 5322's quoted local parts
  and IP-literal domains are not matched).
- IP: dotted-quad IPv4 (0-255 each; a version number such as 1.2.3.4 matches too: it cannot be told
  apart) and IPv6 as Python's `ipaddress` parses it (so times such as 12:30:45 do not match).
- phone: an optional +country code, a 2-4 digit area code (optionally in parentheses), then two or three
  groups of 3-4 digits, separated by spaces, dots or hyphens, 10-15 digits in all; runs of digits
  without separators (ids, amounts) and dates do not match.
"""

from __future__ import annotations

import ipaddress
import re

KINDS = ("email", "ip", "phone")
MASKS = {"email": "<email>", "ip": "<ip>", "phone": "<phone>"}

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?:[ .-]\d{3,4})?(?!\w)")


def _ipv6(match: re.Match) -> bool:
    try:
        return isinstance(ipaddress.ip_address(match.group()), ipaddress.IPv6Address)
    except ValueError:
        return False


def _phone(match: re.Match) -> bool:
    return 10 <= sum(c.isdigit() for c in match.group()) <= 15


_PATTERNS = (("email", _EMAIL, None), ("ip", _IPV4, None), ("ip", _IPV6, _ipv6), ("phone", _PHONE, _phone))


def scan(text: str, mask: bool) -> tuple[str, dict[str, int]]:
    """(`text` with each match replaced by its kind's mask if `mask`, else as it is; matches per kind,
    only kinds found). E-mail addresses are masked first, so their digits never count as a phone."""
    counts: dict[str, int] = {}
    masked = text
    for kind, pattern, check in _PATTERNS:

        def replace(m: re.Match, kind=kind, check=check) -> str:
            if check is not None and not check(m):
                return m.group()
            counts[kind] = counts.get(kind, 0) + 1
            return MASKS[kind]

        masked = pattern.sub(replace, masked)
    return (masked if mask else text), counts
