"""Instruction and chat data: formats -> conversations -> token ids with a loss mask on replies.

The default chat template is the seed project's: `user: {prompt}\nsystem: {completion}</s>`
(the seed calls the assistant "system"). A conversation renders turn after turn; a system
message, if any, is a plain line before the first turn.
"""

# Jinja, as transformers' `apply_chat_template` runs it; written into tokenizer_config.json.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'user: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'system: ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'system: ' }}{% endif %}"
)
