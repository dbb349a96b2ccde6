"""Chat templates that codetune ships by name.

A recipe may name one of these in ``tokenizer.chat_template`` so that a run renders text
exactly as intended whatever revision of the tokenizer files it finds.
"""

from __future__ import annotations

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

BUILTIN_TEMPLATES = {"phi3-2024-05": PHI3_2024_05, "phi3": PHI3, "qwen2": QWEN2, "llama3": LLAMA3}


def resolve_template(value: str | None) -> str | None:
    """A builtin template name -> its Jinja text; a Jinja string passes through; None stays None."""
    if value is None:
        return None
    return BUILTIN_TEMPLATES.get(value, value)
