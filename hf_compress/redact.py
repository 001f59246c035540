"""Secrets never reach a card, a report or a log line: the recorded command and recipe go through here.

A secret option is one whose name has a `token`, `password`, `passwd`, `secret`, `apikey`, `api_key` or
`credentials` word (`--hub_token`, `--db-password`, `--api_secret`; not `--max_tokens` or `--tokenizer_name`, whose
words are `tokens` / `tokenizer`). A secret value is a Hub token (`hf_` and at least 20 letters or digits), the value
of `HF_TOKEN` / `HUGGING_FACE_HUB_TOKEN` in the environment wherever it appears, and the value of a
`HF_TOKEN=...`-style assignment.
"""

from __future__ import annotations

import os
import re

REDACTED = "<redacted>"
_SECRET_WORDS = {"token", "password", "passwd", "secret", "apikey", "credentials"}
# Hub tokens are `hf_` and 34 letters and digits; 20+ keeps words such as `hf_compress_bitmask` readable.
_HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_ASSIGNMENT_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
_ENV_TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def is_secret_name(name: str) -> bool:
    """Whether an option or variable `name` (`--hub_token`, `hub-token`, `HF_TOKEN`) names a secret."""
    words = [w for w in re.split(r"[_\-]+", name.strip("-").lower()) if w]
    return bool(set(words) & _SECRET_WORDS) or "api_key" in name.lower().replace("-", "_")


def redact_value(value: str) -> str:
    """`value` with every Hub token and every environment token value in it replaced by `<redacted>`."""
    out = _HF_TOKEN_RE.sub(REDACTED, value)
    for var in _ENV_TOKENS:
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            out = out.replace(secret, REDACTED)
    return out


def redact_command(argv: list[str]) -> list[str]:
    """
    A copy of the command line `argv` safe to write: the value of every secret option (`--opt value` and
    `--opt=value`), of every `NAME=value` assignment whose name is a secret, and every token-looking value
    anywhere is replaced by `<redacted>`; the option names stay, so the command still reads as what was run.

    Example: `["--hub_token", "abc", "--run_name=x"]` -> `["--hub_token", "<redacted>", "--run_name=x"]`.
    """
    out, i = [], 0
    while i < len(argv):
        arg = str(argv[i])
        if arg.startswith("-") and len(arg) > 1 and not _looks_numeric(arg):
            name, eq, _ = arg.partition("=")
            if is_secret_name(name):
                if eq:
                    out.append(f"{name}={REDACTED}")
                else:
                    out.append(arg)
                    if i + 1 < len(argv) and not str(argv[i + 1]).startswith("--"):
                        out.append(REDACTED)
                        i += 1
                i += 1
                continue
        m = _ASSIGNMENT_RE.match(arg)
        if m and not arg.startswith("-") and is_secret_name(m.group(1)):
            out.append(f"{m.group(1)}={REDACTED}")
        else:
            out.append(redact_value(arg))
        i += 1
    return out


def redact_mapping(values: dict, drop: bool = True) -> dict:
    """A copy of an options mapping (a recipe, `compress()`'s keywords) without its secrets: the values of secret
    names are dropped (`drop=True`) or replaced by `<redacted>`, token-looking strings in the others replaced too."""
    out = {}
    for key, value in values.items():
        if is_secret_name(str(key)):
            if not drop:
                out[key] = REDACTED
            continue
        out[key] = _redact_any(value)
    return out


def _redact_any(value):
    if isinstance(value, str):
        return redact_value(value)
    if isinstance(value, dict):
        return redact_mapping(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_any(v) for v in value)
    return value


def _looks_numeric(arg: str) -> bool:
    try:
        float(arg)
        return True
    except ValueError:
        return False


__all__ = ["REDACTED", "is_secret_name", "redact_command", "redact_mapping", "redact_value"]
