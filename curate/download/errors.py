"""Failure categories of a download: the ledger's `reason`, and which ones are worth a retry.

img2dataset reports a status (`failed_to_download` / `failed_to_resize`) and a free-text
error message (urllib's, OpenCV's, or our limit reasons). `classify` maps the message to a
short category so a billion-row ledger can be grouped; `TRANSIENT` lists the categories
`--retry-failed` re-queues (the server may answer next time: timeouts, 408/429, 5xx,
connection resets, temporary DNS failures). Everything else is a property of the URL:
`bad_url` (not http(s), malformed) and `blocked_address` (the network guard refused where it
points, curate.download.addresses) are never retried.
"""
from __future__ import annotations

import re

# (pattern on the error message, category); first match wins, so specific before general.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), c)
    for p, c in (
        (r"^too_large:", "too_large"),
        (r"^too_many_pixels:", "too_many_pixels"),
        (r"^aspect_ratio:", "aspect_ratio"),
        (r"^bad_url:", "bad_url"),
        (r"^blocked_address:", "blocked_address"),
        (r"^too_many_redirects:", "too_many_redirects"),
        (r"X-Robots-Tag", "x_robots_tag"),
        (r"HTTP Error (\d{3})", "http_{0}"),
        (r"timed? ?out", "timeout"),
        (r"Connection reset|Remote end closed|RemoteDisconnected|IncompleteRead|Broken pipe", "connection_reset"),
        (r"Connection refused", "connection_refused"),
        (r"Temporary failure in name resolution", "dns_temporary"),
        (r"Name or service not known|nodename nor servname|No address associated", "dns"),
        (r"unknown url type|no host given|URL can't contain control", "bad_url"),
        (r"certificate|SSL", "tls"),
        (r"hash mismatch", "hash_mismatch"),
        (r"image too small", "too_small"),
        (r"aspect ratio too large", "aspect_ratio"),
        (r"image area too large", "too_many_pixels"),
        (r"decod|cannot identify|truncated|broken data stream", "decode_error"),
    )
)

TRANSIENT = frozenset({"timeout", "connection_reset", "dns_temporary", "http_408", "http_429"})


def classify(status: str | None, message: str | None) -> str:
    """`("failed_to_download", "HTTP Error 404: Not Found")` -> "http_404"."""
    text = message or ""
    for pattern, category in _PATTERNS:
        m = pattern.search(text)
        if m:
            return category.format(*m.groups())
    return status or "unknown"


def is_transient(category: str) -> bool:
    """True for categories a later attempt may fix (see TRANSIENT; every HTTP 5xx)."""
    return category in TRANSIENT or re.fullmatch(r"http_5\d\d", category) is not None
