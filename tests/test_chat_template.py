"""M1 chat template: the rendered text must match what M1's Jinja template produces, byte for byte.

The expected strings are written out from the template (MiniMax-AI/MiniMax-M1 tokenizer_config.json); the first one
is the rendered example of architecture.md §10.
"""

import pytest

from m1jax.chat_template import render_chat
from m1jax.tokenizer import M1_SPECIAL_TOKENS, train_bpe_tokenizer


def parts(text: str) -> list[dict]:
    return [{"type": "text", "text": text}]


EXAMPLE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nsimple\n</think>\n4"},
    {"role": "user", "content": "And 3+3?"},
]

EXAMPLE_RENDERED = """\
<begin_of_document><beginning_of_sentence>system ai_setting=assistant
You are a helpful assistant.<end_of_sentence>
<beginning_of_sentence>user name=user
What is 2+2?<end_of_sentence>
<beginning_of_sentence>ai name=assistant
<think>
simple
</think>
4<end_of_sentence>
<beginning_of_sentence>user name=user
And 3+3?<end_of_sentence>
<beginning_of_sentence>ai name=assistant
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo d'une ville",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

TOOLS_RENDERED = """\
<begin_of_document><beginning_of_sentence>system ai_setting=assistant
Be brief.<end_of_sentence>
<beginning_of_sentence>system tool_setting=tools
You are provided with these tools:
<tools>
{"type": "function", "function": {"name": "get_weather", "description": "Météo d'une ville", \
"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
{"name": "now"}
</tools>

If you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and provide tool-name and \
json-object of arguments, following the format below:
<tool_calls>
{"name": <tool-name-1>, "arguments": <args-json-object-1>}
...
</tool_calls><end_of_sentence>
<beginning_of_sentence>user name=user
Weather in Paris?<end_of_sentence>
<beginning_of_sentence>ai name=assistant
<think>
call it
</think>
<tool_calls>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_calls><end_of_sentence>
<beginning_of_sentence>tool name=tools
tool name: get_weather
tool result: sunny, 21°C

tool name: now
tool result: 12:00

<end_of_sentence>
"""


def test_architecture_example_byte_for_byte():
    assert render_chat(EXAMPLE) == EXAMPLE_RENDERED
    as_parts = [{**message, "content": parts(message["content"])} for message in EXAMPLE]
    assert render_chat(as_parts) == EXAMPLE_RENDERED


def test_generation_prompt_is_optional():
    without = render_chat(EXAMPLE, add_generation_prompt=False)
    prompt = "<beginning_of_sentence>ai name=assistant\n"
    assert EXAMPLE_RENDERED == without + prompt
    assert without.endswith("And 3+3?<end_of_sentence>\n")


def test_tools_and_tool_results():
    messages = [
        {"role": "system", "content": parts("Be brief.")},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "<think>\ncall it\n</think>\n"},
                {"type": "image", "text": "not text: skipped"},
                {"type": "text", "text": '<tool_calls>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'},
                {"type": "text", "text": "</tool_calls>"},
            ],
        },
        {
            "role": "tool",
            "content": [
                {"type": "text", "name": "get_weather", "text": "sunny, 21°C"},
                {"type": "text", "name": "now", "text": "12:00"},
            ],
        },
    ]
    tools = [WEATHER_TOOL, {"name": "now"}]
    assert render_chat(messages, tools=tools, add_generation_prompt=False) == TOOLS_RENDERED


def test_tool_message_with_string_content_takes_the_name():
    rendered = render_chat([{"role": "tool", "name": "now", "content": "12:00"}], add_generation_prompt=False)
    assert rendered == (
        "<begin_of_document><beginning_of_sentence>tool name=tools\n"
        "tool name: now\ntool result: 12:00\n\n<end_of_sentence>\n"
    )


def test_system_messages_are_joined_into_the_first_turn():
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "A."},
        {"role": "system", "content": [*parts(" B."), *parts("ignored: only the first part counts")]},
    ]
    assert render_chat(messages, add_generation_prompt=False) == (
        "<begin_of_document><beginning_of_sentence>system ai_setting=assistant\nA. B.<end_of_sentence>\n"
        "<beginning_of_sentence>user name=user\nhi<end_of_sentence>\n"
    )


def test_no_system_turn_for_empty_system_text_or_empty_tool_list():
    rendered = render_chat([{"role": "system", "content": ""}, {"role": "user", "content": "hi"}], tools=[])
    assert rendered == (
        "<begin_of_document><beginning_of_sentence>user name=user\nhi<end_of_sentence>\n"
        "<beginning_of_sentence>ai name=assistant\n"
    )
    assert render_chat([]) == "<begin_of_document><beginning_of_sentence>ai name=assistant\n"


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"role": "robot", "content": "x"}, "message 1 has role 'robot'"),
        ({"content": "x"}, "message 1 has role None"),
        ({"role": "user"}, r"message 1 \(user\) has no content"),
        ({"role": "assistant", "content": None}, r"message 1 \(assistant\) has no content"),
        ({"role": "user", "content": []}, "message 1 .* empty content list"),
        ({"role": "user", "content": [{"type": "text"}]}, "message 1 .* part 0: needs string text"),
        ({"role": "assistant", "content": [{"type": "text", "text": 3}]}, "message 1 .* part 0: needs string text"),
        ({"role": "tool", "content": "12:00"}, r"message 1 \(tool\) has string content but no 'name'"),
        ({"role": "tool", "content": parts("12:00")}, "message 1 .* part 0: needs string name"),
        ({"role": "user", "content": ["x"]}, "message 1 .* list of dicts"),
        ("user: hi", "message 1 must be a dict"),
    ],
)
def test_bad_messages_name_the_message(bad, match):
    with pytest.raises(ValueError, match=match):
        render_chat([{"role": "user", "content": "ok"}, bad])


def test_bad_tools():
    with pytest.raises(ValueError, match="tool 1 must be a JSON schema dict"):
        render_chat(EXAMPLE, tools=[WEATHER_TOOL, "get_weather"])
    with pytest.raises(ValueError, match="tool 0 is not JSON-serialisable"):
        render_chat(EXAMPLE, tools=[{"name": "f", "default": object()}])


def test_rendered_prompt_encodes_special_tokens_as_single_ids():
    tokenizer = train_bpe_tokenizer([EXAMPLE_RENDERED, TOOLS_RENDERED] * 3, vocab_size=400)
    ids = tokenizer.encode(EXAMPLE_RENDERED)
    assert tokenizer.decode(ids) == EXAMPLE_RENDERED
    begin_of_document, begin_of_sentence, end_of_sentence, _ = (tokenizer.token_to_id(t) for t in M1_SPECIAL_TOKENS)
    assert ids[:2] == [begin_of_document, begin_of_sentence]
    assert ids.count(begin_of_sentence) == 5 and ids.count(end_of_sentence) == 4
    assert tokenizer.token_to_id("<think>") in ids and tokenizer.token_to_id("</think>") in ids
