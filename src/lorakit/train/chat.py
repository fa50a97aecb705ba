"""Chat conversations as text pieces, cut at every assistant turn; one reading for training and serving.

A chat template renders a whole conversation as one string, but training must know which parts
are the assistant's (they carry the loss) and serving must feed the model exactly the tokens
training showed it. Both read conversations through :func:`prompt_pieces`: the template is
rendered for growing prefixes of the conversation (the way that works with any template), and
the string is cut where each assistant turn starts and ends. Every piece is then tokenized on its
own, by training and by the server alike, so a history that contains earlier assistant turns is
the same token sequence in both.

A template that rewrites earlier turns when a later one is added (some strip an assistant's
reasoning from the history) cannot be cut this way; its conversations are then read as one
piece, and only their last assistant turn can be trained (:data:`TURNS`: "last").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

# Used when the tokenizer has no chat template (the same text in Jinja: serve.DEFAULT_CHAT_TEMPLATE).
DEFAULT_TURN = "<|{role}|>\n{content}\n"
DEFAULT_ASSISTANT_PROMPT = "<|assistant|>\n"
TURNS = ("all", "last")  # which assistant turns of a conversation the loss covers
TEMPLATE_FILE = "chat_template.jinja"  # beside an adapter trained with --chat-template (transformers' own name)


class TemplateError(ValueError):
    """A chat template that does not extend a conversation's prompt with its answer."""


@dataclass(frozen=True)
class Piece:
    """A stretch of rendered text; ``answer`` marks an assistant turn (what training can learn)."""

    text: str
    answer: bool = False


def has_template(tokenizer: Any, template: str | None = None) -> bool:
    return bool(template or getattr(tokenizer, "chat_template", None))


def render(tokenizer: Any, messages: Sequence[dict[str, Any]], generation_prompt: bool,
           template: str | None = None) -> str:
    """The conversation as the model reads it: ``template`` (an adapter's own), the tokenizer's,
    or lorakit's default."""
    if template:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt,
                                             chat_template=template)
    if has_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    text = "".join(DEFAULT_TURN.format(role=m["role"], content=m["content"]) for m in messages)
    return text + (DEFAULT_ASSISTANT_PROMPT if generation_prompt else "")


def prompt_pieces(tokenizer: Any, messages: Sequence[dict[str, Any]], template: str | None = None) -> list[Piece]:
    """The prompt for the assistant's next turn after ``messages``, cut at the assistant turns it holds.

    One piece when the template rewrites earlier turns (then the history cannot be cut)."""
    whole = render(tokenizer, messages, generation_prompt=True, template=template)
    try:
        pieces = _cut(tokenizer, messages, template)
    except TemplateError:
        return [Piece(whole)]
    done = "".join(p.text for p in pieces)
    if not whole.startswith(done):
        return [Piece(whole)]
    return [*pieces, Piece(whole[len(done):])]


def conversation_pieces(tokenizer: Any, messages: Sequence[dict[str, Any]], turns: str = "all") -> list[Piece]:
    """A conversation that ends with an assistant turn, as pieces whose answers carry the loss:
    every assistant turn (``turns="all"``, as TRL and axolotl train) or the last one only.

    The prompt before the last answer is exactly what :func:`prompt_pieces` gives the server."""
    if turns not in TURNS:
        raise ConfigError(f"--chat-turns must be one of {', '.join(TURNS)}, got {turns!r}")
    prompt = prompt_pieces(tokenizer, messages[:-1])
    rendered_prompt = "".join(p.text for p in prompt)
    full = render(tokenizer, messages, generation_prompt=False)
    if not full.startswith(rendered_prompt):
        raise TemplateError("the chat template does not extend the prompt with the answer")
    if turns == "all" and len(prompt) == 1 and any(m["role"] == "assistant" for m in messages[:-1]):
        raise TemplateError("the chat template rewrites earlier turns when a later one is added, so only the last "
                            "assistant turn can be trained; pass --chat-turns last")
    if turns == "last":
        prompt = [Piece(p.text) for p in prompt]
    return [*prompt, Piece(full[len(rendered_prompt):], answer=True)]


def _cut(tokenizer: Any, messages: Sequence[dict[str, Any]], template: str | None = None) -> list[Piece]:
    """Pieces up to the end of the last assistant turn in ``messages`` (context, answer, context, ...)."""
    pieces: list[Piece] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True, template=template)
        after = render(tokenizer, messages[:i + 1], generation_prompt=False, template=template)
        if not before.startswith(done) or not after.startswith(before):
            raise TemplateError("the chat template rewrites earlier turns")
        pieces += [Piece(before[len(done):]), Piece(after[len(before):], answer=True)]
        done = after
    return pieces


def read_template(path: str | Path) -> str:
    """A Jinja chat template from a file (``--chat-template``), checked to be one before any work."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--chat-template {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if "messages" not in text:
        raise ConfigError(f"--chat-template {path}: not a chat template (a Jinja template that loops over "
                          "'messages', as tokenizer_config.json's chat_template)")
    try:
        import jinja2

        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"--chat-template {path}:{exc.lineno}: {exc.message}") from exc
    return text


def saved_template(adapter_folder: str | Path) -> str | None:
    """The chat template an adapter was trained with (--chat-template), if it was given one."""
    path = Path(adapter_folder) / TEMPLATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def use_adapter_templates(tokenizer: Any, adapter_folders: Sequence[str | Path]) -> str | None:
    """Give ``tokenizer`` the chat template the adapters were trained with, so their chats are read
    as in training; refuse adapters trained with different ones. The template used, or None."""
    found = {str(folder): text for folder in adapter_folders if (text := saved_template(folder)) is not None}
    if len(set(found.values())) > 1:
        raise ConfigError(f"these adapters were trained with different chat templates ({', '.join(found)}); "
                          "evaluate or serve them separately")
    if not found:
        return None
    tokenizer.chat_template = next(iter(found.values()))
    return tokenizer.chat_template
