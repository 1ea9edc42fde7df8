"""Chat messages -> one prompt string, through a Jinja chat template rendered as transformers renders it.

The template is, in order: `--chat-template FILE`, the tokenizer config's `chat_template`, else the
built-in plain template below. GPT-2 was never trained on a chat format, so the built-in one is only a
readable transcript that ends where the assistant's reply should begin:

    system: You are terse.
    user: Hello!
    assistant:

(one "role: content" line per message, then "assistant:" when add_generation_prompt). A template that
fails to render is the request's problem (400), never a server error.
"""
from __future__ import annotations

import json
import os

from .protocol import APIError

PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _raise_exception(message):  # transformers exposes this to templates for their own checks
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, origin: str):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # transformers' settings: trim_blocks + lstrip_blocks, a sandbox, the loopcontrols extension
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = _raise_exception
        self.template = env.from_string(source)
        self.source, self.origin = source, origin

    def render(self, messages: list[dict], add_generation_prompt: bool, special_tokens: dict, extra: dict | None = None,
               continue_final_message: bool = False) -> str:
        """The prompt text. continue_final_message (as transformers and vLLM take it): the text ends with the
        last message's content, left open for the model to continue (what the template writes after it to
        close the message is cut)."""
        from jinja2.exceptions import TemplateError

        if continue_final_message and add_generation_prompt:
            raise APIError("`continue_final_message` and `add_generation_prompt` cannot both be true: the first "
                           "continues the last message, the second opens a new one. Send add_generation_prompt: "
                           "false.", param="continue_final_message")
        if continue_final_message:  # mark where the last content ends (transformers 5 does the same)
            messages = messages[:-1] + [{**messages[-1], "content": messages[-1]["content"] + _OPEN_END}]
        try:
            text = self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **special_tokens, **(extra or {}))
        except TemplateError as e:
            raise APIError(f"The chat template ({self.origin}) could not render these messages: {e}", param="messages") from None
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise APIError(f"The chat template ({self.origin}) failed on these messages: {type(e).__name__}: {e}",
                           param="messages") from None
        if continue_final_message:
            at = text.rfind(_OPEN_END.strip())
            if at < 0:
                raise APIError(f"The chat template ({self.origin}) does not write the final message's content as "
                               "it is, so it cannot be continued; send continue_final_message: false.",
                               param="continue_final_message")
            # a template that trims the content trimmed the mark's space too: then trim what it left
            text = text[:at] if text.startswith(_OPEN_END, at) else text[:at].rstrip()
        return text


_OPEN_END = "GPT2KIT_OPEN_END_OF_MESSAGE "  # appended to the message continue_final_message leaves open


def load_chat_template(path: str | None, tokenizer_dir: str | None) -> ChatTemplate:
    """The template to use (see the module docstring for the order)."""
    from ..errors import GPT2KitFileError, InvalidInputError

    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except OSError as e:
            raise GPT2KitFileError(f"--chat-template {path!r} cannot be read: {e.strerror}.") from None
        origin = f"--chat-template {path}"
    else:
        source = _tokenizer_config_template(tokenizer_dir)
        origin = "tokenizer_config.json" if source is not None else "built-in plain template"
        if source is None:
            source = PLAIN_TEMPLATE
    from jinja2.exceptions import TemplateSyntaxError

    try:
        return ChatTemplate(source, origin)
    except TemplateSyntaxError as e:
        raise InvalidInputError(f"The chat template ({origin}) is not valid Jinja: {e} (line {e.lineno}).") from None


def _tokenizer_config_template(tokenizer_dir: str | None) -> str | None:
    if not tokenizer_dir:
        return None
    jinja_file = os.path.join(tokenizer_dir, "chat_template.jinja")  # transformers 4.43+ saves it here
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    config_file = os.path.join(tokenizer_dir, "tokenizer_config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def message_dicts(messages) -> list[dict]:
    """Pydantic messages -> plain dicts; list-of-parts content is joined to its text parts."""
    out = []
    for i, m in enumerate(messages):
        d = m.model_dump(exclude_none=True)
        content = d.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                                   "supported by this text-only model.", param=f"messages.{i}.content")
                texts.append(part["text"])
            d["content"] = "\n".join(texts)
        d.setdefault("content", "")
        out.append(d)
    return out
