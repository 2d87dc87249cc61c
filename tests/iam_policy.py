"""The part of AWS IAM policy evaluation that the cluster recipe's permission check needs.

Identity policies only: an explicit Deny wins, then any Allow; anything else is refused. Action/NotAction
and Resource/NotResource take IAM's wildcards (`*` any run, `?` one character; actions ignore case). A
statement with a Condition cannot be judged without the request, so its Allow is not counted and its Deny
is: what this cannot prove allowed is reported missing, never the other way round.
"""
from __future__ import annotations

import re


def _matches(patterns: str | list[str], value: str, ignore_case: bool) -> bool:
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        if re.fullmatch(rx, value, re.IGNORECASE if ignore_case else 0):
            return True
    return False


def _applies(statement: dict, action: str, resource: str) -> bool:
    if "NotAction" in statement:
        hit = not _matches(statement["NotAction"], action, ignore_case=True)
    else:
        hit = _matches(statement.get("Action", []), action, ignore_case=True)
    if "NotResource" in statement:
        return hit and not _matches(statement["NotResource"], resource, ignore_case=False)
    return hit and _matches(statement.get("Resource", "*"), resource, ignore_case=False)


def allowed(documents: list[dict], action: str, resource: str = "*") -> bool:
    """Whether the policy `documents` of one identity allow `action` on `resource`."""
    statements = [s for d in documents for s in ([d["Statement"]] if isinstance(d["Statement"], dict) else d["Statement"])]
    hits = [s for s in statements if _applies(s, action, resource)]
    if any(s["Effect"] == "Deny" for s in hits):
        return False
    return any(s["Effect"] == "Allow" and "Condition" not in s for s in hits)


def missing(documents: list[dict], needs: list[tuple[str, str]]) -> list[str]:
    """Each (action, resource) of `needs` that `documents` do not allow, as 'action on resource'."""
    return [f"{action} on {resource}" for action, resource in needs if not allowed(documents, action, resource)]
