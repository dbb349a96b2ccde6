"""Chat templates that codetune ships by name.

A recipe may name one of these in ``tokenizer.chat_template`` so that a run renders text
exactly as intended whatever revision of the tokenizer files it finds.
"""

from __future__ import annotations

from dataclasses import dataclass

# Phi-3-mini tokenizer_config.json as of 2024-05 (the revision the reference notebook used):
# a bos in front, no system role, no eos at the end.
PHI3_2024_05 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{message['content'] + '<|end|>' + '\n'}}"
    "{% endif %}{% endfor %}"
)

# The current Phi-3-mini template: system role, no bos, eos after the last turn when not generating.
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Qwen2.5's ChatML without the tool-calling branches: its default system turn when the conversation
# has none, <|im_end|> and a newline after every turn.
QWEN2 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Llama-3's template without the tool and date preamble of 3.1+: a bos, a header per turn, <|eot_id|>.
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

# Qwen3's template without tools: ChatML, no default system turn, and the thinking switch. The answer
# that ends a conversation carries an empty think block ("<think>\n\n</think>\n\n") before its text,
# and the generation prompt writes that block when enable_thinking is false, so the prompt stays a
# prefix of the conversation and the model answers without thinking. An earlier answer loses its think.
QWEN3 = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set content = message['content'].split('</think>')[-1].lstrip('\n') %}"
    "{%- if loop.last %}{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + content + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)

BUILTIN_TEMPLATES = {"phi3-2024-05": PHI3_2024_05, "phi3": PHI3, "qwen2": QWEN2, "qwen3": QWEN3, "llama3": LLAMA3}


def with_template_defaults(template: str, defaults: dict) -> str:
    """``template`` with ``defaults`` for the variables a caller may pass to apply_chat_template (Qwen3's
    enable_thinking): each is set unless the caller gives it. Written into the template itself, so every
    renderer (prepare, generation, the server, vLLM, llama.cpp) sees the same default."""
    import json

    prefix = "".join(
        f"{{%- if {name} is not defined %}}{{%- set {name} = {json.dumps(value)} %}}{{%- endif %}}"
        for name, value in defaults.items()
    )
    return template if template.startswith(prefix) else prefix + template


def resolve_template(value: str | None) -> str | None:
    """A builtin template name -> its Jinja text; a Jinja string passes through; None stays None."""
    if value is None:
        return None
    return BUILTIN_TEMPLATES.get(value, value)


# ---------------------------------------------------------------------------------------
# Reference tokenizers: what a run that reproduces another must find in the tokenizer it is given


@dataclass(frozen=True)
class ReferenceTokenizer:
    """A tokenizer a recipe must reproduce (``tokenizer.reference``): the chat template its files carry and the
    ids the reference's own stack gave for one known conversation, as a training row (the template rendered and
    tokenized with the special tokens the tokenizer adds) and as an evaluation prompt (no special tokens added)."""

    name: str
    source: str  # what made the ids
    chat_template: str
    messages: list[dict]
    text: str  # the conversation rendered, add_generation_prompt=False
    ids: list[int]  # the training row's ids
    prompt_ids: list[int]  # the first turn rendered with add_generation_prompt=True


# The "empty input" row of tests/fixtures/seed_token_ids.json: transformers 4.40.2 (the notebook's version) on
# the 2024-05 Phi-3-mini tokenizer files, with add_eos_token=True. A "▁" (29871) precedes every "\n" that follows
# a special token; the current revision of the files drops it (its special tokens strip what follows them).
PHI3_2024_05_REFERENCE = ReferenceTokenizer(
    name="phi3-2024-05",
    source="transformers 4.40.2 on the 2024-05 Phi-3-mini-4k-instruct tokenizer (add_eos_token=True)",
    chat_template=PHI3_2024_05,
    messages=[
        {"role": "user", "content": "Write a function to find the shared elements from the given two lists.\n Input: "},
        {
            "role": "assistant",
            "content": "def similar_elements(test_tup1, test_tup2):\n  res = tuple(set(test_tup1) & set(test_tup2))\n"
            "  return (res) ",
        },
    ],
    text="<s><|user|>\nWrite a function to find the shared elements from the given two lists.\n Input: <|end|>\n"
    "<|assistant|>\ndef similar_elements(test_tup1, test_tup2):\n  res = tuple(set(test_tup1) & set(test_tup2))\n"
    "  return (res) <|end|>\n",
    ids=[
        1, 1, 32010, 29871, 13, 6113, 263, 740, 304, 1284, 278, 7258, 3161, 515, 278, 2183, 1023, 8857, 29889, 13,
        10567, 29901, 29871, 32007, 29871, 13, 32001, 29871, 13, 1753, 2788, 29918, 17664, 29898, 1688, 29918,
        29873, 786, 29896, 29892, 1243, 29918, 29873, 786, 29906, 1125, 13, 29871, 620, 353, 18761, 29898, 842,
        29898, 1688, 29918, 29873, 786, 29896, 29897, 669, 731, 29898, 1688, 29918, 29873, 786, 29906, 876, 13,
        29871, 736, 313, 690, 29897, 29871, 32007, 29871, 13, 32000,
    ],
    prompt_ids=[
        1, 32010, 29871, 13, 6113, 263, 740, 304, 1284, 278, 7258, 3161, 515, 278, 2183, 1023, 8857, 29889, 13,
        10567, 29901, 29871, 32007, 29871, 13, 32001, 29871, 13,
    ],
)  # fmt: skip

REFERENCE_TOKENIZERS = {PHI3_2024_05_REFERENCE.name: PHI3_2024_05_REFERENCE}
