"""Chat templates: how the served model writes its turns.

A template comes from the model where it carries one (a GGUF's ``tokenizer.chat_template``),
else from a template shipped as data in ``templates/`` and chosen by the model's family or by
``RMESH_CHAT_TEMPLATE`` (a name, or a path to a Jinja file in the Hugging Face chat-template
format). No model's markers are written in code: prompts are lists of (role, text) turns.
Templates render in Jinja's sandbox; ``bos_token`` renders empty because the tokenizer adds it.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rmesh.errors import ConfigError

TEMPLATES_DIR = pathlib.Path(__file__).resolve().parent / "templates"
# Model families (a GGUF's general.architecture, or words in a served model's path) and the
# shipped template each uses.
FAMILIES = {"gemma": "gemma", "qwen": "chatml", "chatml": "chatml"}

Turn = tuple[str, str]  # (role: "user" | "assistant" | "system", text)


def _raise(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, name: str) -> None:
        self.name = name
        environment = ImmutableSandboxedEnvironment()
        environment.globals["raise_exception"] = _raise
        try:
            self._template = environment.from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"chat template {name}: not a Jinja template ({exc})") from None

    def render(self, turns: Sequence[Turn], add_generation_prompt: bool = True) -> str:
        """The turns as the model reads them; with ``add_generation_prompt`` the model's turn is
        opened for it to write."""
        messages = [{"role": role, "content": text} for role, text in turns]
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token="", eos_token=""
        )

    @classmethod
    def named(cls, name_or_path: str) -> "ChatTemplate":
        """A shipped template by name, or a Jinja file by path."""
        shipped = TEMPLATES_DIR / f"{name_or_path}.jinja"
        if shipped.is_file():
            return cls(shipped.read_text(), name_or_path)
        path = pathlib.Path(name_or_path)
        if path.suffix and path.is_file():
            return cls(path.read_text(), str(path))
        known = ", ".join(sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja")))
        raise ConfigError(f"RMESH_CHAT_TEMPLATE={name_or_path}: no such template (shipped: {known}; or a path to a .jinja file)")

    @classmethod
    def for_model(cls, description: str) -> "ChatTemplate | None":
        """The shipped template of the family a model's architecture or path names, if any."""
        lowered = description.lower()
        for family, name in FAMILIES.items():
            if family in lowered:
                return cls.named(name)
        return None
