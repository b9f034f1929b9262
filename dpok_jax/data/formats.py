"""The three row formats, and their normalization to plain ``prompt / chosen / rejected`` strings.

- explicit: string columns ``prompt``, ``chosen``, ``rejected``.
- implicit (HH-RLHF): string columns ``chosen`` and ``rejected`` holding whole dialogues; the prompt is
  their shared prefix up to and including the last ``"\\n\\nAssistant:"``, the responses are the rest.
- conversational: ``chosen`` and ``rejected`` are lists of ``{"role", "content"}`` messages, with the
  prompt either in a ``prompt`` message list or as the messages both share; rendered to text with the
  tokenizer's chat template.

Row problems raise `RowError` with a reason code of `report.REASONS`; the loader records it in the
``_bad_row`` column instead of dropping the row, so `tokenize_pairs` counts it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

FORMATS = ("explicit", "implicit", "conversational")
ASSISTANT_MARKER = "\n\nAssistant:"
BAD_ROW_COLUMN = "_bad_row"


class RowError(Exception):
    """One row cannot be used: `reason` is a `report.REASONS` code, `detail` says what was found."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def as_text(value: Any, field: str) -> str:
    """`value` as a valid string, or `RowError` (missing, not a string, undecodable).

    Bytes (e.g. a Parquet binary column) are decoded as strict UTF-8.

    >>> as_text(b"caf\\xc3\\xa9", "chosen")
    'café'
    >>> as_text(None, "chosen")
    Traceback (most recent call last):
    dpok_jax.data.formats.RowError: missing_field: 'chosen' is null or absent
    """
    if value is None:
        raise RowError("missing_field", f"{field!r} is null or absent")
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowError("undecodable", f"{field!r} is not valid UTF-8 ({e.reason} at byte {e.start})")
    if not isinstance(value, str):
        raise RowError("not_a_string", f"{field!r} is a {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError("undecodable", f"{field!r} holds an invalid character at {e.start} ({e.reason})")
    return value


def split_implicit(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen_response, rejected_response)`` of two whole dialogues (HH-RLHF style).

    The prompt is the shared prefix up to and including its last ``"\\n\\nAssistant:"``.

    >>> split_implicit("\\n\\nHuman: Hi\\n\\nAssistant: Hello!", "\\n\\nHuman: Hi\\n\\nAssistant: Go away.")
    ('\\n\\nHuman: Hi\\n\\nAssistant:', ' Hello!', ' Go away.')
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise RowError("no_shared_prompt", f"no shared prefix ending in {ASSISTANT_MARKER!r} "
                                           f"(chosen starts {chosen[:40]!r})")
    end = cut + len(ASSISTANT_MARKER)
    return chosen[:end], chosen[end:], rejected[end:]


def _check_messages(messages: Any, field: str) -> list[dict]:
    """The messages of `field`, unchanged (extra keys such as ``name`` are kept for the template)."""
    if messages is None:
        raise RowError("missing_field", f"{field!r} is null or absent")
    if isinstance(messages, str):
        raise RowError("bad_conversation", f"{field!r} is a string, not a list of messages "
                                           "(the other rows of this data are conversations)")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RowError("bad_conversation", f"{field!r} is not a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            have = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise RowError("bad_conversation", f"{field}[{i}] is not a {{role, content}} message (has {have})")
        as_text(m["role"], f"{field}[{i}].role")
        as_text(m["content"], f"{field}[{i}].content")
    return [dict(m) for m in messages]


def render_conversation(prompt: Sequence[dict] | None, chosen: Sequence[dict], rejected: Sequence[dict],
                        tokenizer: Any) -> tuple[str, str, str]:
    """Texts ``(prompt, chosen_response, rejected_response)`` of a conversational pair.

    Without `prompt`, the prompt is the messages `chosen` and `rejected` share, and both must go on
    with an assistant message. The prompt renders with the generation prompt; each response is its
    full conversation's rendering minus the prompt's (the template must render the prompt the same).

    >>> from dpok_jax.data.tokenizer import ByteTokenizer
    >>> u = {"role": "user", "content": "2+2?"}
    >>> render_conversation(None, [u, {"role": "assistant", "content": "4"}],
    ...                     [u, {"role": "assistant", "content": "5"}], ByteTokenizer())
    ('user: 2+2?\\nassistant: ', '4\\n', '5\\n')
    """
    chosen = _check_messages(chosen, "chosen")
    rejected = _check_messages(rejected, "rejected")
    if chosen == rejected:
        raise RowError("identical_responses", "chosen and rejected are the same conversation")
    if prompt is None:
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if not prompt:
            raise RowError("bad_conversation", "chosen and rejected share no leading message (the prompt)")
    else:
        prompt = _check_messages(prompt, "prompt")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply or reply[0]["role"] != "assistant":
            raise RowError("bad_conversation", f"{name} does not go on with an assistant message after "
                                               f"the {len(prompt)} prompt messages")
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        texts = [tokenizer.apply_chat_template(prompt + reply, tokenize=False) for reply in (chosen, rejected)]
    except Exception as e:  # jinja errors from a template that rejects this conversation
        raise RowError("bad_conversation", f"the chat template failed: {type(e).__name__}: {e}")
    out = []
    for name, text in zip(("chosen", "rejected"), texts):
        if not text.startswith(prompt_text):
            raise RowError("chat_template_mismatch", f"{name}'s rendering does not start with the "
                                                     f"rendered prompt {prompt_text[-40:]!r}")
        out.append(text[len(prompt_text):])
    return prompt_text, out[0], out[1]


def detect_format(rows: Sequence[dict], source: str) -> str:
    """``explicit``, ``implicit`` or ``conversational`` by the shape most rows have.

    ``chosen`` holding a message list in more rows than it holds a string makes the data
    conversational; otherwise a ``prompt`` key in most rows makes it explicit, and its absence
    implicit. Rows of another shape are then bad rows of their own (the majority decides, so one odd
    row cannot change how the others are read).

    >>> detect_format([{"chosen": [{"role": "user", "content": "hi"}], "rejected": []},
    ...                {"chosen": "odd", "rejected": "row"}, {"chosen": [], "rejected": []}], "demo")
    'conversational'
    """
    cols = set().union(*(r.keys() for r in rows)) if rows else set()
    missing = {"chosen", "rejected"} - cols
    if missing:
        raise ValueError(f"data {source}: no column(s) {sorted(missing)}; found {sorted(cols)}. "
                         "Preference data needs chosen and rejected (and prompt for the explicit format).")
    lists = sum(isinstance(r.get("chosen"), (list, tuple)) for r in rows)
    texts = sum(isinstance(r.get("chosen"), (str, bytes)) for r in rows)
    if lists > texts:
        return "conversational"
    textual = [r for r in rows if not isinstance(r.get("chosen"), (list, tuple))]
    with_prompt = sum("prompt" in r for r in textual)
    return "explicit" if 2 * with_prompt > len(textual) else "implicit"


def normalize_row(row: dict, fmt: str, tokenizer: Any = None) -> tuple[str | None, str | None, str | None, str | None]:
    """``(prompt, chosen, rejected, bad_row)`` of one raw row; `bad_row` is ``"reason: detail"`` or None.

    Every format's texts are checked here (`as_text`); a text value is never altered.
    """
    try:
        if fmt == "explicit":
            p, c, r = (as_text(row.get(k), k) for k in ("prompt", "chosen", "rejected"))
            return p, c, r, None
        if fmt == "implicit":
            p, c, r = split_implicit(as_text(row.get("chosen"), "chosen"), as_text(row.get("rejected"), "rejected"))
            return p, c, r, None
        if fmt == "conversational":
            p, c, r = render_conversation(row.get("prompt"), row.get("chosen"), row.get("rejected"), tokenizer)
            return p, c, r, None
    except RowError as e:
        return None, None, None, str(e)
    raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS} or 'auto'")
