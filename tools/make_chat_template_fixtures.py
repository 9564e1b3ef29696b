#!/usr/bin/env python3
"""Chat-template fixtures for moemesh's Jinja interpreter (core/chat_template.h).

For each model family below this writes, under tests/fixtures/chat_templates/<family>/:

- tokenizer_config.json: the family's chat_template and special tokens, as the model ships them;
- cases.json: conversations (messages, add_generation_prompt, extra variables such as tools or
  enable_thinking) and the exact string transformers renders for each, or the error it raises.

The references come from transformers itself: a tokenizer is loaded with
PreTrainedTokenizerFast.from_pretrained() from a temporary directory holding the fixture's
tokenizer_config.json (plus a tiny tokenizer.json), and rendered with
apply_chat_template(..., tokenize=False). Nothing is downloaded.

The chat_template strings are reproduced here for testing from the tokenizer_config.json files
that mistralai, Qwen, allenai, deepseek-ai and moonshotai publish with their models on the
Hugging Face Hub. They were written down from the public files and may differ from the current
Hub revisions in small details; what matters for the tests is that the reference output is what
transformers renders for exactly the template stored beside it.

_forms/ holds model directories in the other layouts load_chat_template reads
(chat_template.jinja, additional_chat_templates/, the list-of-named-templates form, the legacy
special_tokens_map.json), and unsupported.json holds templates with constructs the interpreter
refuses at parse time, with the error substring expected.

Usage: python tools/make_chat_template_fixtures.py [--out DIR]
(needs the reference environment of tools/requirements-reference.txt, transformers 5.24.0, with
Jinja2 3.1.6; every cases.json records the two versions it was made with)
"""

import argparse
import copy
import json
import os
import shutil
import tempfile

import jinja2
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import _compile_jinja_template

# ------------------------------------------------------------------------------------------------
# Templates (reproduced for testing; see the module docstring).

MIXTRAL = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

# The template Mixtral-8x7B-Instruct-v0.1 first shipped with.
MIXTRAL_LEGACY = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)

# Qwen2-57B-A14B-Instruct and Qwen1.5-MoE-A2.7B-Chat.
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

QWEN2_5 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen3-30B-A3B / Qwen3-235B-A22B.
QWEN3 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# allenai/OLMoE-1B-7B-0924-Instruct (the Tulu format).
OLMOE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
)

# deepseek-ai/DeepSeek-V3 (the revision with tool calls after content).
DEEPSEEK_V3 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}"
    "{%- endif %}{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- else %}"
    "{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)

# moonshotai/Kimi-K2-Instruct.
KIMI_K2 = """{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>
{%- endif -%}
{%- for message in messages -%}
  {%- if loop.first and messages[0]['role'] != 'system' -%}
    <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
  {%- endif -%}

  {%- set role_name =  message.get('name') or  message['role'] -%}
  {%- if message['role'] == 'user' -%}
    <|im_user|>{{role_name}}<|im_middle|>
  {%- elif message['role'] == 'assistant' -%}
    <|im_assistant|>{{role_name}}<|im_middle|>
  {%- else -%}
    <|im_system|>{{role_name}}<|im_middle|>
  {%- endif -%}

  {%- if message['role'] == 'assistant' and message.get('tool_calls') -%}
    {%- if message['content'] -%}{{ message['content'] }}{%- endif -%}
    <|tool_calls_section_begin|>
    {%- for tool_call in message['tool_calls'] -%}
      {%- set formatted_id = tool_call['id'] -%}
      <|tool_call_begin|>{{ formatted_id }}<|tool_call_argument_begin|>{% if tool_call['function']['arguments'] is string %}{{ tool_call['function']['arguments'] }}{% else %}{{ tool_call['function']['arguments'] | tojson }}{% endif %}<|tool_call_end|>
    {%- endfor -%}
    <|tool_calls_section_end|>
  {%- elif message['role'] == 'tool' -%}
    ## Return of {{ message.tool_call_id }}
{{ message['content'] }}
  {%- elif message['content'] is string -%}
    {{ message['content'] }}
  {%- elif message['content'] is not none -%}
    {% for content in message['content'] -%}
      {% if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}
        <|media_start|>image<|media_content|><|media_pad|><|media_end|>
      {% else -%}
        {{ content['text'] }}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  <|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""


def added_token(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


# ------------------------------------------------------------------------------------------------
# Conversations.

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
HELLO = {"role": "user", "content": "Hello!"}
HI = {"role": "assistant", "content": "Hi! How can I help you today?"}
ASK = {"role": "user", "content": "What is 2 + 2?\nAnswer briefly."}
UNICODE_USER = {"role": "user",
                "content": "Grüß Gott — 你好 👋 «quotes» \"double\" 'single' \\backslash\ttab"}
UNICODE_ASSISTANT = {"role": "assistant", "content": "Ça va ? 🙂 Ünïcödé ✓"}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city (°C or °F).",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "description": "The local time.",
                 "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}},
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
WEATHER_ASK = {"role": "user", "content": "What's the weather in Paris and in Zürich?"}


def tool_calls(arguments_as_string=False, with_ids=False):
    calls = [
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"city": "Paris", "unit": "celsius"}}},
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"city": "Zürich", "days": 2,
                                                        "ratio": 0.5}}},
    ]
    for i, c in enumerate(calls):
        if arguments_as_string:
            c["function"]["arguments"] = json.dumps(c["function"]["arguments"],
                                                    ensure_ascii=False)
        if with_ids:
            c["id"] = f"functions.get_weather:{i}"
    return calls


TOOL_RESULTS = [
    {"role": "tool", "content": '{"temperature": 18, "sky": "cloudy"}', "tool_call_id": "functions.get_weather:0"},
    {"role": "tool", "content": '{"temperature": 9.5, "sky": "snow ❄"}', "tool_call_id": "functions.get_weather:1"},
]
FINAL = {"role": "assistant", "content": "Paris: 18 °C, cloudy. Zürich: 9.5 °C with snow."}


def case(name, messages, add_generation_prompt=True, **extra):
    return {"name": name, "messages": messages, "add_generation_prompt": add_generation_prompt,
            "extra": extra}


BASIC = [
    case("single_turn", [HELLO]),
    case("single_turn_no_generation_prompt", [HELLO], False),
    case("system_single_turn", [SYSTEM, HELLO]),
    case("multi_turn", [SYSTEM, HELLO, HI, ASK]),
    case("multi_turn_no_system", [HELLO, HI, ASK]),
    case("multi_turn_ends_with_assistant", [HELLO, HI], False),
    case("unicode", [UNICODE_USER, UNICODE_ASSISTANT, ASK]),
    case("null_keys_dropped", [dict(HELLO, name=None), HI, ASK]),
]


def qwen_tool_cases(arguments_as_string):
    calls_msg = {"role": "assistant", "content": "", "tool_calls": tool_calls(arguments_as_string)}
    calls_null = {"role": "assistant", "content": None, "tool_calls": tool_calls(arguments_as_string)}
    calls_text = {"role": "assistant", "content": "Let me check.",
                  "tool_calls": tool_calls(arguments_as_string)[:1]}
    return [
        case("tools_declared", [SYSTEM, WEATHER_ASK], tools=TOOLS),
        case("tools_declared_no_system", [WEATHER_ASK], tools=TOOLS),
        case("tool_calls_and_results", [SYSTEM, WEATHER_ASK, calls_msg] + TOOL_RESULTS + [FINAL],
             False, tools=TOOLS),
        case("tool_calls_content_null", [WEATHER_ASK, calls_null] + TOOL_RESULTS, tools=TOOLS),
        case("tool_call_with_text", [WEATHER_ASK, calls_text, TOOL_RESULTS[0]], tools=TOOLS),
        case("empty_tools_list", [SYSTEM, HELLO], tools=[]),
    ]


QWEN3_EXTRA = [
    case("enable_thinking_false", [SYSTEM, HELLO], enable_thinking=False),
    case("enable_thinking_true", [HELLO], enable_thinking=True),
    case("reasoning_content_history",
         [HELLO, dict(HI, reasoning_content="The user greets me.\n"), ASK,
          {"role": "assistant", "content": "4", "reasoning_content": "2 + 2 = 4."}], False),
    case("think_tags_in_content",
         [HELLO, {"role": "assistant", "content": "<think>\nGreeting.\n</think>\n\nHi there!"},
          ASK, {"role": "assistant", "content": "<think>Sum.</think>4"}], False),
    case("reasoning_alias_fields",
         [HELLO, {"role": "assistant", "content": "Hey.", "reasoning": "short"}], False),
    case("multi_step_tool_query",
         [SYSTEM, WEATHER_ASK,
          {"role": "assistant", "content": "", "reasoning_content": "Need weather.",
           "tool_calls": tool_calls()[:1]},
          {"role": "tool", "content": "sunny"},
          {"role": "user", "content": "<tool_response>\nextra\n</tool_response>"},
          {"role": "assistant", "content": "Sunny in Paris.", "reasoning_content": "Done."}],
         True, tools=TOOLS, enable_thinking=False),
]

DEEPSEEK_EXTRA = [
    case("two_system_messages", [SYSTEM, {"role": "system", "content": "Be brief."}, HELLO]),
    case("think_stripped_from_history",
         [HELLO, {"role": "assistant", "content": "<think>greeting</think>Hi!"}, ASK]),
    case("tool_calls_and_outputs",
         [WEATHER_ASK, {"role": "assistant", "content": "", "tool_calls": tool_calls(True)}]
         + TOOL_RESULTS + [FINAL, ASK]),
    case("tool_outputs_pending", [WEATHER_ASK,
                                  {"role": "assistant", "content": "Checking.",
                                   "tool_calls": tool_calls(True)[:1]},
                                  TOOL_RESULTS[0]]),
    case("tool_calls_content_null_errors",
         [WEATHER_ASK, {"role": "assistant", "content": None, "tool_calls": tool_calls(True)}]),
]

KIMI_EXTRA = [
    case("tools_declared", [WEATHER_ASK], tools=TOOLS),
    case("tool_calls_and_results",
         [SYSTEM, WEATHER_ASK,
          {"role": "assistant", "content": "I'll check.", "tool_calls": tool_calls(False, True)}]
         + TOOL_RESULTS + [FINAL], False, tools=TOOLS),
    case("tool_call_arguments_string",
         [WEATHER_ASK, {"role": "assistant", "content": "",
                        "tool_calls": tool_calls(True, True)[:1]}, TOOL_RESULTS[0]],
         tools=TOOLS),
    case("named_user_and_content_parts",
         [{"role": "user", "name": "alice",
           "content": [{"type": "text", "text": "Describe this:"},
                       {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                       {"type": "text", "text": "Thanks!"}]}]),
]

MIXTRAL_EXTRA = [
    case("roles_must_alternate", [HELLO, HELLO]),
    case("tool_role_refused", [HELLO, {"role": "tool", "content": "x"}]),
]

FAMILIES = {
    "mixtral": {
        "config": {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                   "model_max_length": 1000000000000000019884624838656, "legacy": True,
                   "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
                   "chat_template": MIXTRAL},
        "cases": BASIC + MIXTRAL_EXTRA,
    },
    "mixtral_legacy": {
        "config": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "chat_template": MIXTRAL_LEGACY},
        "cases": BASIC + MIXTRAL_EXTRA,
    },
    "qwen2": {
        "config": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "unk_token": None, "chat_template": QWEN2},
        "cases": BASIC,
    },
    "qwen2_5": {
        "config": {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072,
                   "errors": "replace", "split_special_tokens": False,
                   "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "unk_token": None, "chat_template": QWEN2_5},
        "cases": BASIC + qwen_tool_cases(False),
    },
    "qwen3": {
        "config": {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072,
                   "clean_up_tokenization_spaces": False,
                   "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "unk_token": None, "chat_template": QWEN3},
        "cases": BASIC + qwen_tool_cases(False) + [
            case("tool_call_arguments_string",
                 [WEATHER_ASK, {"role": "assistant", "content": "",
                                "tool_calls": tool_calls(True)}] + TOOL_RESULTS, tools=TOOLS)
        ] + QWEN3_EXTRA,
    },
    "olmoe": {
        "config": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|padding|>", "unk_token": None, "chat_template": OLMOE},
        "cases": BASIC,
    },
    "deepseek_v3": {
        "config": {"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": False,
                   "model_max_length": 16384, "legacy": True,
                   "bos_token": added_token("<｜begin▁of▁sentence｜>"),
                   "eos_token": added_token("<｜end▁of▁sentence｜>"),
                   "pad_token": added_token("<｜end▁of▁sentence｜>"), "unk_token": None,
                   "chat_template": DEEPSEEK_V3},
        "cases": BASIC + DEEPSEEK_EXTRA,
    },
    "kimi_k2": {
        "config": {"tokenizer_class": "TikTokenTokenizer", "model_max_length": 1000000000000000019884624838656,
                   "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]",
                   "pad_token": "[PAD]", "chat_template": KIMI_K2},
        "cases": BASIC + KIMI_EXTRA,
    },
}

# ------------------------------------------------------------------------------------------------
# Other layouts of a model directory (load_chat_template).

FORM_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n"
                 "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
TOOL_USE_TEMPLATE = ("{{ bos_token }}TOOLS {{ tools | map(attribute='function.name') | join(',') }}"
                     "\n{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")

FORMS = {
    # chat_template.jinja beats the "chat_template" of tokenizer_config.json.
    "jinja_file": {
        "config": {"bos_token": "<s>", "eos_token": "</s>",
                   "chat_template": "IGNORED {{ messages }}"},
        "files": {"chat_template.jinja": "JINJA FILE " + FORM_TEMPLATE + "\n"},
        "cases": [case("single_turn", [HELLO]), case("with_tools", [HELLO], tools=TOOLS)],
    },
    "named_list": {
        "config": {"bos_token": added_token("<bos>"), "eos_token": "<eos>",
                   "chat_template": [{"name": "default", "template": "DEFAULT " + FORM_TEMPLATE},
                                     {"name": "tool_use", "template": TOOL_USE_TEMPLATE}]},
        "files": {},
        "cases": [case("without_tools", [HELLO, HI]), case("with_tools", [HELLO], tools=TOOLS)],
    },
    "additional_templates": {
        "config": {"bos_token": "<s>", "eos_token": "</s>"},
        "files": {"chat_template.jinja": "FILE " + FORM_TEMPLATE,
                  "additional_chat_templates/tool_use.jinja": TOOL_USE_TEMPLATE},
        "cases": [case("without_tools", [HELLO]), case("with_tools", [HELLO], tools=TOOLS)],
    },
    # Without "added_tokens_decoder", transformers merges special_tokens_map.json over the config.
    "legacy_special_tokens_map": {
        "config": {"bos_token": "<s>", "eos_token": "</s>", "chat_template": FORM_TEMPLATE +
                   "|{{ eos_token }}|{{ pad_token }}|{{ mask_token }}"},
        "files": {"special_tokens_map.json": json.dumps(
            {"eos_token": {"content": "<|end|>", "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False},
             "pad_token": "<pad>", "mask_token": "<mask>"})},
        "cases": [case("single_turn", [HELLO])],
    },
}

# Templates the interpreter must refuse at parse time: (name, template, expected error substrings).
UNSUPPORTED = [
    ("include", "{% include 'other.jinja' %}", ["include", "line 1"]),
    ("extends", "text\n{% extends 'base.jinja' %}", ["extends", "line 2"]),
    ("import", "{% import 'macros.jinja' as m %}", ["import", "line 1"]),
    ("block", "a\nb\n{% block body %}x{% endblock %}", ["block", "line 3"]),
    ("unknown_filter", "{{ messages | frobnicate }}", ["unknown filter 'frobnicate'", "line 1"]),
    ("unsupported_filter", "{% for g in messages | groupby('role') %}{% endfor %}",
     ["filter 'groupby'", "line 1"]),
    ("unknown_test", "\n{% if x is frobnicated %}{% endif %}", ["unknown test 'frobnicated'", "line 2"]),
    ("unknown_method", "{{ messages[0].content.casefold() }}", ["casefold", "line 1"]),
    ("unknown_function", "{{ lipsum(2) }}", ["lipsum", "line 1"]),
    ("do_tag", "{% do messages.append(1) %}", ["unknown tag 'do'", "line 1"]),
    ("recursive_loop", "{% for m in messages recursive %}{{ loop(m.children) }}{% endfor %}",
     ["recursive", "line 1"]),
    ("unclosed_if", "{% if true %}\nyes\n", ["if", "line 1", "endif"]),
    ("unclosed_for", "{% for m in messages %}{{ m }}", ["for", "endfor"]),
    ("unclosed_variable", "Hello {{ name", ["{{", "line 1"]),
    ("unclosed_comment", "a\n{# note", ["comment", "line 2"]),
    ("unclosed_string", "{{ 'abc }}", ["string", "line 1"]),
    ("stray_endfor", "x\n{% endfor %}", ["endfor", "line 2"]),
    ("bad_expression", "{{ 1 + }}", ["line 1"]),
    ("unbalanced_bracket", "{{ (1 + 2 }}", ["line 1"]),
]


def tiny_tokenizer_dir(config, files):
    d = tempfile.mkdtemp(prefix="chat_template_")
    vocab = {"<unk>": 0}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False)
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(d, name)), exist_ok=True)
        with open(os.path.join(d, name), "w", encoding="utf-8") as f:
            f.write(text)
    return d


def render_cases(config, files, cases):
    d = tiny_tokenizer_dir(config, files)
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(d)
        out = []
        for c in cases:
            c = copy.deepcopy(c)
            try:
                c["expected"] = tokenizer.apply_chat_template(
                    copy.deepcopy(c["messages"]), add_generation_prompt=c["add_generation_prompt"],
                    tokenize=False, **copy.deepcopy(c["extra"]))
            except Exception as e:  # the template raised: store the message
                c["error"] = str(e)
            out.append(c)
        return out
    finally:
        shutil.rmtree(d)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures",
                                                      "chat_templates"))
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    versions = {"transformers_version": transformers.__version__,
                "jinja2_version": jinja2.__version__}
    for name, fam in list(FAMILIES.items()) + [("_forms/" + k, v) for k, v in FORMS.items()]:
        d = os.path.join(out, name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        files = fam.get("files", {})
        write_json(os.path.join(d, "tokenizer_config.json"), fam["config"])
        for fname, text in files.items():
            path = os.path.join(d, fname)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        cases = render_cases(fam["config"], files, fam["cases"])
        write_json(os.path.join(d, "cases.json"), dict(versions, cases=cases))
        n_err = sum("error" in c for c in cases)
        print(f"{name}: {len(cases)} cases ({n_err} raising)")
    unsupported = []
    for name, template, needles in UNSUPPORTED:
        # Record whether Jinja2 itself (transformers' environment) accepts the template at all.
        try:
            _compile_jinja_template(template)
            jinja_parses = True
        except Exception:
            jinja_parses = False
        unsupported.append({"name": name, "template": template, "error_contains": needles,
                            "jinja2_parses": jinja_parses})
    write_json(os.path.join(out, "unsupported.json"), dict(versions, templates=unsupported))
    print(f"unsupported.json: {len(unsupported)} templates")


if __name__ == "__main__":
    main()
