"""Chat templating for supervised fine-tuning: rows as conversations, their checks, and the tokens a model learns.

A conversation is rendered with the tokenizer's chat template; what the assistant says is found by rendering it
prefix by prefix (:func:`assistant_spans`), so any template works, with or without ``{% generation %}`` markers.
"""

from __future__ import annotations

from typing import Any

from ptft.core.errors import PtftError
from ptft.text.base import column

ROLES = ("system", "user", "assistant")

#: The format used when the tokenizer has no chat template (Zephyr's): every turn is ``<|role|>``, a newline, the
#: text and the end-of-sequence token; a reply is prompted by ``<|assistant|>`` and a newline.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + (eos_token if eos_token else '') + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# --- conversations ----------------------------------------------------------------------------------------------
def as_conversations(
    ds: Any, messages_column: str, prompt_column: str | None, response_column: str | None, system_prompt: str | None
) -> list[list[dict[str, Any]]]:
    """Every row as a list of ``{role, content}`` messages (prompt/response pairs become a user and an assistant turn).

    ``system_prompt`` is prepended to conversations that have no system message; ``response_column=None`` (predict)
    leaves the assistant turn out.
    """
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if prompt_column is not None:
        prompts = column(ds, prompt_column)
        responses = column(ds, response_column) if response_column else [None] * len(prompts)
        reply = (lambda r: [{"role": "assistant", "content": r}]) if response_column else (lambda r: [])
        return [system + [{"role": "user", "content": p}] + reply(r) for p, r in zip(prompts, responses)]
    conversations = column(ds, messages_column)
    if system:
        conversations = [
            c if not isinstance(c, list) or any(isinstance(m, dict) and m.get("role") == "system" for m in c)
            else system + c
            for c in conversations
        ]
    return conversations


def check_conversations(conversations: list[Any], where: str, need_reply: bool, pairs: bool) -> None:
    """One-line error naming how many rows have a problem and the first of them; nothing if all are well-formed."""
    problems: dict[str, list[int]] = {}
    bad_roles: list[str] = []
    reply = "response" if pairs else "assistant reply"
    for i, conv in enumerate(conversations):
        if not isinstance(conv, list) or not conv or not all(isinstance(m, dict) and "role" in m for m in conv):
            problems.setdefault("a conversation that is not a list of {role, content} messages", []).append(i)
            continue
        roles = [m.get("role") for m in conv]
        odd = [r for r in roles if r not in ROLES]
        if odd:
            problems.setdefault("a role other than system/user/assistant", []).append(i)
            bad_roles.append(repr(odd[0]))
            continue
        if any(not isinstance(m.get("content"), str) or not m["content"].strip() for m in conv if m["role"] != "assistant"):
            problems.setdefault("an empty prompt" if pairs else "an empty or missing user/system message", []).append(i)
        if need_reply:
            replies = [m.get("content") for m in conv if m["role"] == "assistant"]
            if not replies:
                problems.setdefault("no assistant turn", []).append(i)
            elif any(not isinstance(r, str) or not r.strip() for r in replies):
                problems.setdefault(f"an empty {reply}", []).append(i)
        elif all(r == "assistant" for r in roles):
            problems.setdefault("no prompt (only assistant turns)", []).append(i)
    for problem, rows in problems.items():
        detail = f", role {bad_roles[0]}" if problem.startswith("a role") else ""
        raise PtftError(
            f"{where}: {problem} in {len(rows)} of {len(conversations)} rows (first: row {rows[0]}{detail}); "
            "fix or drop those rows"
        )


def prompt_part(conversation: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """What a reply is generated from (the conversation without a final assistant turn) and that turn's text."""
    if conversation[-1]["role"] == "assistant":
        return conversation[:-1], conversation[-1]["content"]
    return conversation, None


def render(tokenizer: Any, template: str, messages: list[dict[str, Any]], generation_prompt: bool, row: int) -> str:
    """The chat template applied to ``messages``, as text; a template's own error becomes a one-line error."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja2's TemplateError, raise_exception(...) of strict templates
        raise PtftError(f"the chat template rejects conversation row {row}: {str(err).splitlines()[0]}") from err


def assistant_spans(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], row: int
) -> tuple[str, list[tuple[int, int]], int]:
    """The rendered conversation, the character span of each assistant turn in it, and how many turns were skipped.

    A turn's span is what rendering ``messages[:i + 1]`` adds to rendering ``messages[:i]`` with the generation
    prompt: the reply and its end-of-turn marker, without the header the prompt already holds (works with any
    template, with or without ``{% generation %}`` markers). Trailing whitespace after the end-of-turn marker is not
    learned. A turn is skipped when the template renders it differently once later turns follow (e.g. templates
    that drop earlier reasoning), since its tokens would then not be the ones in the training text.
    """
    text = render(tokenizer, template, messages, False, row)
    spans, skipped = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:i], True, row)
        through = text if i == len(messages) - 1 else render(tokenizer, template, messages[: i + 1], False, row)
        if not (text.startswith(through) and through.startswith(before) and len(through) > len(before)):
            skipped += 1
            continue
        added = through[len(before):]
        spans.append((len(before), len(before) + len(added.rstrip() or added)))
    return text, spans, skipped


def label_tokens(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """``input_ids`` where a token overlaps an assistant span, -100 (ignored by the loss) elsewhere."""
    return [
        token if any(s < end and e > start for start, end in spans) else -100
        for token, (s, e) in zip(input_ids, offsets)
    ]
