"""Names, tags, digests and references: their patterns and parsing.

- name: OCI repository style, lowercase components ``[a-z0-9]+([._-][a-z0-9]+)*``
  joined by ``/`` (``math``, ``team/math-lora``), at most 128 characters.
- tag: ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``.
- digest: ``sha256:`` + 64 lowercase hex digits.

Every path built from a name, tag or digest is built only after it matched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from patchctl.errors import InvalidReference

NAME_RE = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
DEFAULT_TAG = "latest"


def is_digest(s: str) -> bool:
    return DIGEST_RE.fullmatch(s) is not None


def check_digest(s: str) -> str:
    if not is_digest(s):
        raise InvalidReference(f"invalid digest {s!r}: expected sha256: followed by 64 lowercase hex digits")
    return s


def check_name(name: str) -> str:
    if len(name) > 128 or not NAME_RE.fullmatch(name):
        raise InvalidReference(
            f"invalid name {name!r}: use lowercase letters, digits and . _ - between them, "
            "components joined by / (e.g. team/math-lora)"
        )
    return name


def check_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise InvalidReference(
            f"invalid tag {tag!r}: use letters, digits, . _ - (not first), at most 128 characters"
        )
    return tag


@dataclass(frozen=True)
class Ref:
    name: str
    tag: str

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def parse_ref(s: str, default_tag: str | None = DEFAULT_TAG) -> Ref:
    """Parse ``name[:tag]``; a missing tag becomes ``default_tag`` (or is an error); ``name:`` is an error."""
    if not isinstance(s, str) or not s:
        raise InvalidReference("empty reference: expected NAME:TAG")
    name, sep, tag = s.rpartition(":")
    if not sep or "/" in tag:
        name, tag, sep = s, "", ""
    if sep and not tag:
        raise InvalidReference(f"empty tag in {s!r}: write NAME:TAG, or NAME alone for NAME:{default_tag or 'TAG'}")
    if not tag:
        if default_tag is None:
            raise InvalidReference(f"reference {s!r} needs a tag: NAME:TAG")
        tag = default_tag
    return Ref(check_name(name), check_tag(tag))
