"""What the server says about adapters, in words for the people who read it.

lorakit's errors suggest what a *Python caller* can do (``check_fingerprint=False``,
``model.resize_token_embeddings(n)``), and ``lorakit.cli.in_cli_words`` turns those into the
command's flags. An HTTP client can do neither: it chooses only what it sends and to which
server. :func:`in_http_words` rewrites each such suggestion into that, and is applied wherever a
:class:`~lorakit.errors.LorakitError` becomes a :class:`~lorakit.serve.jobs.ServeError`.

:func:`quantised_base_note` says when an adapter was trained on a quantised base (QLoRA): this
server runs its base unquantised, so answers differ slightly from what training saw, as
``lorakit merge`` also reports. The server logs it and returns it in the load's ``warnings``.
"""

from __future__ import annotations

import re
from typing import Any

TRAINED_BASE = "load it on a server started with the base model it was trained on"

# (a suggestion lorakit's messages make to Python callers, what an HTTP client can do instead)
HTTP_WORDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"Load the base it was trained on, or pass check_fingerprint=False to load it anyway\."),
     TRAINED_BASE[0].upper() + TRAINED_BASE[1:] + "."),
    (re.compile(r"\s*\(check_fingerprint=False loads it anyway\)"), ""),
    (re.compile(r"call model\.resize_token_embeddings\((\d+)\) before loading\."),
     r"load it on a server whose base model has that vocabulary (\1 tokens), as in training."),
    (re.compile(r"copy it into (\S+?)\.weight first, or pass check_fingerprint=False to ignore it\."),
     r"load it on a server started with a base model whose \1.weight is that copy."),
    # anything the rules above do not know yet: never send a Python argument to an HTTP client
    (re.compile(r"pass check_fingerprint=False"), TRAINED_BASE),
    (re.compile(r"check_fingerprint=False"), "a server started with the base model it was trained on"),
)


def in_http_words(message: str | BaseException) -> str:
    """``message`` with each suggestion meant for Python callers replaced by what an HTTP client can do."""
    text = str(message)
    for pattern, replacement in HTTP_WORDS:
        text = pattern.sub(replacement, text)
    return text


def quantised_base_note(name: str, lorakit_metadata: dict[str, Any] | None) -> str | None:
    """A note for an adapter trained on a quantised base (its metadata's ``quantize``), else None."""
    mode = (lorakit_metadata or {}).get("quantize")
    if not mode or mode == "none":
        return None
    return (f"adapter {name!r} was trained on a base quantised to {mode} (QLoRA); this server runs the base "
            "unquantised, so its outputs differ slightly from what training saw")
