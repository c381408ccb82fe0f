"""M1's chat template, transcribed from the Jinja `chat_template` of MiniMax-AI/MiniMax-M1 `tokenizer_config.json`.

For valid messages the output equals transformers' `apply_chat_template` with the original template, byte for byte
(tools are serialised like transformers' `tojson`: `json.dumps(tool, ensure_ascii=False)`). Beyond the original:
`content` may be a plain string (the original needs a list of `{"type": "text", "text": ...}` parts), a tool
message with string content takes its tool name from the message's `name`, and messages the original would
render wrongly or silently drop (unknown role, missing content) raise ValueError.

As in the original, a system or user message contributes only its first content part, an assistant message all
its `type == "text"` parts, and a tool message one `tool name: ...\\ntool result: ...` item per part.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from m1jax.tokenizer import BEGIN_OF_DOCUMENT, BEGIN_OF_SENTENCE, END_OF_SENTENCE

ROLES = ("system", "user", "assistant", "tool")

_TOOL_CALL_INSTRUCTIONS = (
    "</tools>\n\n"
    "If you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and provide tool-name and "
    "json-object of arguments, following the format below:\n"
    "<tool_calls>\n"
    '{"name": <tool-name-1>, "arguments": <args-json-object-1>}\n'
    "...\n"
    "</tool_calls>"
)


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The M1 prompt text for `messages` (dicts with `role` and `content`) and optional tool JSON schemas."""
    messages = [_normalise(i, message) for i, message in enumerate(messages)]
    rendered = [BEGIN_OF_DOCUMENT]
    system_prompt = "".join(parts[0]["text"] for role, parts in messages if role == "system")
    if system_prompt:
        rendered.append(_turn("system ai_setting=assistant", system_prompt))
    if tools:
        rendered.append(_turn("system tool_setting=tools", _tools_prompt(tools)))
    for role, parts in messages:
        if role == "user":
            rendered.append(_turn("user name=user", parts[0]["text"]))
        elif role == "assistant":
            rendered.append(_turn("ai name=assistant", "".join(p["text"] for p in parts if p.get("type") == "text")))
        elif role == "tool":
            results = "".join(f"tool name: {p['name']}\ntool result: {p['text']}\n\n" for p in parts)
            rendered.append(_turn("tool name=tools", results))
    if add_generation_prompt:
        rendered.append(f"{BEGIN_OF_SENTENCE}ai name=assistant\n")
    return "".join(rendered)


def _turn(header: str, body: str) -> str:
    return f"{BEGIN_OF_SENTENCE}{header}\n{body}{END_OF_SENTENCE}\n"


def _tools_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tool {i} must be a JSON schema dict, got {type(tool).__name__}")
        try:
            lines.append(json.dumps(tool, ensure_ascii=False) + "\n")
        except (TypeError, ValueError) as e:
            raise ValueError(f"tool {i} is not JSON-serialisable: {e}") from e
    return "You are provided with these tools:\n<tools>\n" + "".join(lines) + _TOOL_CALL_INSTRUCTIONS


def _normalise(index: int, message: Any) -> tuple[str, list[Mapping[str, Any]]]:
    """(role, content parts) of a message, checked; string content becomes one text part."""
    if not isinstance(message, Mapping):
        raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}")
    content = message.get("content")
    if content is None:
        raise ValueError(f"message {index} ({role}) has no content")
    if isinstance(content, str):
        part: dict[str, Any] = {"type": "text", "text": content}
        if role == "tool":
            if not isinstance(message.get("name"), str):
                raise ValueError(f"message {index} (tool) has string content but no 'name' naming the tool")
            part["name"] = message["name"]
        return role, [part]
    if not isinstance(content, Sequence) or not all(isinstance(p, Mapping) for p in content):
        raise ValueError(f"message {index} ({role}): content must be a string or a list of dicts")
    if role in ("system", "user") and not content:
        raise ValueError(f"message {index} ({role}) has an empty content list")
    required = ("name", "text") if role == "tool" else ("text",)
    for j, part in _parts_read(role, content):
        missing = [key for key in required if not isinstance(part.get(key), str)]
        if missing:
            raise ValueError(f"message {index} ({role}), content part {j}: needs string {' and '.join(missing)}")
    return role, list(content)


def _parts_read(role: str, content: Sequence[Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
    """The (index, part) pairs the original template reads for a message of this role."""
    if role in ("system", "user"):
        return [(0, content[0])]
    if role == "assistant":
        return [(j, part) for j, part in enumerate(content) if part.get("type") == "text"]
    return list(enumerate(content))
