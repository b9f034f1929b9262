"""`BadRowReport`: every row skipped (counted by reason) or altered (truncated), never silently."""

from __future__ import annotations

import dataclasses
import json
from etils import epath

# Reason code -> what it means; docs/data.md repeats this table for users.
REASONS: dict[str, str] = {
    "missing_field": "a required field (prompt, chosen, rejected, a message list or an embedding) is absent or null",
    "not_a_string": "a text field holds something else than a string (number, list, ...)",
    "undecodable": "text that is not valid UTF-8 (bytes, a JSON line that cannot be decoded, lone surrogates)",
    "invalid_json": "a JSON Lines line that does not parse, or a line or array element that is not an object",
    "invalid_csv": "a CSV record with more or fewer fields than the header",
    "bad_embedding": "an embedding_* value that is not a list of numbers",
    "empty_response": "chosen or rejected is empty or only whitespace",
    "identical_responses": "chosen and rejected are the same text: the pair carries no preference",
    "no_shared_prompt": "implicit format: chosen and rejected share no prefix ending in '\\n\\nAssistant:'",
    "bad_conversation": "conversational format: not a list of {role, content} messages, or no assistant reply "
                        "after the shared prompt",
    "chat_template_mismatch": "conversational format: the chat template renders the prompt differently "
                              "inside the full conversation, so the reply cannot be cut out",
    "empty_prompt": "the prompt has no tokens and the tokenizer has no BOS: the first response token has no "
                    "context to be scored in",
    "identical_after_truncation": "chosen and rejected differ only beyond max_length",
    "unknown_task": "the task value is not among the given task_names",
}


@dataclasses.dataclass
class BadRowReport:
    """Counts of skipped rows by reason (with example rows) and of truncated fields.

    A row is named by where it came from: ``"path:LINE"`` (1-based line) for JSON Lines, JSON and CSV
    files, ``"path record N"`` (1-based) for Parquet, and ``"row N"`` (0-based position) for an
    in-memory dataset.

    >>> r = BadRowReport(source="demo")
    >>> r.add("empty_response", "pairs.jsonl:3", "chosen is empty"); r.add("empty_response", 7); r.kept = 8
    >>> r.total_skipped, r.counts, r.examples
    (2, {'empty_response': 2}, {'empty_response': ['pairs.jsonl:3', 'row 7']})
    >>> print(r.summary())
    demo: kept 8 of 10 rows, skipped 2
      empty_response: 2 (pairs.jsonl:3, row 7)
        e.g. pairs.jsonl:3: chosen is empty
    """

    source: str = ""
    max_examples: int = 10
    kept: int = 0
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    details: dict[str, str] = dataclasses.field(default_factory=dict)  # first detail per reason
    truncated: dict[str, int] = dataclasses.field(default_factory=dict)  # field -> rows cut

    def add(self, reason: str, where: int | str, detail: str = "") -> None:
        """Record that a row was skipped for `reason` (one of `REASONS`); `where` is its origin
        (``"path:LINE"``) or its 0-based position in an in-memory dataset."""
        if reason not in REASONS:
            raise ValueError(f"unknown bad-row reason {reason!r}; known: {sorted(REASONS)}")
        label = where if isinstance(where, str) else f"row {int(where)}"
        self.counts[reason] = self.counts.get(reason, 0) + 1
        rows = self.examples.setdefault(reason, [])
        if len(rows) < self.max_examples:
            rows.append(label)
        if detail and reason not in self.details:
            self.details[reason] = f"{label}: {detail}"

    def add_truncated(self, field: str) -> None:
        """Record that one row's `field` (prompt, chosen, rejected) was truncated to fit."""
        self.truncated[field] = self.truncated.get(field, 0) + 1

    @property
    def total_skipped(self) -> int:
        """Number of rows skipped, all reasons together."""
        return sum(self.counts.values())

    @property
    def total_rows(self) -> int:
        """Rows seen: kept plus skipped."""
        return self.kept + self.total_skipped

    def summary(self) -> str:
        """A few human-readable lines: totals, each reason with example rows, truncation counts."""
        name = f"{self.source}: " if self.source else ""
        lines = [f"{name}kept {self.kept} of {self.total_rows} rows, skipped {self.total_skipped}"]
        for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            rows = ", ".join(map(str, self.examples.get(reason, [])))
            more = ", ..." if n > len(self.examples.get(reason, [])) else ""
            lines.append(f"  {reason}: {n} ({rows}{more})")
            if reason in self.details:
                lines.append(f"    e.g. {self.details[reason]}")
        for field, n in sorted(self.truncated.items()):
            lines.append(f"  truncated {field}: {n} rows (kept)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready contents, with the meaning of each reason that occurred."""
        return {
            "source": self.source, "total_rows": self.total_rows, "kept": self.kept,
            "total_skipped": self.total_skipped, "skipped": dict(self.counts),
            "example_rows": {k: list(v) for k, v in self.examples.items()},
            "details": dict(self.details), "truncated": dict(self.truncated),
            "reasons": {k: REASONS[k] for k in self.counts},
        }

    def save(self, path: epath.PathLike) -> epath.Path:
        """Write `to_dict()` as JSON to `path` (parent folders created; local or `gs://...`); returns
        the path."""
        path = epath.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path
