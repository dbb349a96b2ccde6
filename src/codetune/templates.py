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

BUILTIN_TEMPLATES = {"phi3-2024-05": PHI3_2024_05, "phi3": PHI3}


def resolve_template(value: str | None) -> str | None:
    """A builtin template name -> its Jinja text; a Jinja string passes through; None stays None."""
    if value is None:
        return None
    return BUILTIN_TEMPLATES.get(value, value)
