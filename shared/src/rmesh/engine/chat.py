"""Chat templates: how the served model writes its turns.

A template comes from the model where it carries one (a GGUF's ``tokenizer.chat_template``),
else from a template shipped as data in ``templates/`` and chosen by the model's family or by
``RMESH_CHAT_TEMPLATE`` (a name, or a path to a Jinja file in the Hugging Face chat-template
format). No model's markers are written in code: prompts are lists of (role, text) turns.
Templates render in Jinja's sandbox; ``bos_token`` renders empty because the tokenizer adds it.

Turn text is a caller's (a problem, evidence) and the engines read the rendered prompt with
special tokens parsed, so text holding the template's own turn markers would open and close
turns of its own: a forged model turn. Every marker the template writes, and every control
token an engine names (``add_markers``), is defused in turn text: a word joiner (U+2060) after
its first character, so it reads the same and tokenizes as plain text. A template that marks a
turn boundary with plain words alone (``assistant:``) is refused: nothing there could be defused.
An engine with no vocabulary to read control tokens from (SGLang) adds the well-known ones of
the common model families, shipped as data (``with_known_control_tokens``).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Sequence

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rmesh.errors import ConfigError

TEMPLATES_DIR = pathlib.Path(__file__).resolve().parent / "templates"
# Model families (a GGUF's general.architecture, or words in a served model's path) and the
# shipped template each uses.
FAMILIES = {"gemma": "gemma", "qwen": "chatml", "chatml": "chatml"}
# Families with no shipped template. A path naming one of them is never matched to another
# family it also names: DeepSeek-R1-Distill-Qwen writes DeepSeek's turns, not Qwen's.
UNSHIPPED_FAMILIES = ("deepseek", "mistral", "mixtral", "llama", "phi", "zephyr")

Turn = tuple[str, str]  # (role: "user" | "assistant" | "system", text)
# What a special token's text looks like in a template: <name>, <|name|>, </s>, <｜User｜> (any
# short run in angle brackets without spaces), or [INST], [/INST] (a word in square brackets).
_MARKER = re.compile(r"<[^<>\s]{1,64}>|\[/?[A-Za-z_]{2,32}\]")
# Control tokens of common model families (Gemma, ChatML/Qwen, Llama 3, Mistral, DeepSeek, Phi)
# that a prompt may hold outside the template's own markers, one per line.
KNOWN_CONTROL_TOKENS = TEMPLATES_DIR / "control-tokens.txt"
_JOINER = "\u2060"
_END = ""  # the trie key that ends a marker: no character is the empty string
_PROBE = "\x00"


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
        self.markers: frozenset[str] = frozenset()
        self.boundaries: tuple[str, ...] = ()  # the text the template writes between turns
        self.add_markers(self._markers())

    def _markers(self) -> set[str]:
        """The special-token text the template writes around turns, read from the shapes of
        prompt the mesh renders (a user turn opening the model's; a user and an assistant turn,
        closed; a worked example then a user turn opening the model's). A template that cannot
        write them is refused, and so is one where any text between two turns holds no special
        token: a caller could write that boundary itself."""
        user, assistant = {"role": "user", "content": _PROBE}, {"role": "assistant", "content": _PROBE}
        written, boundaries = [], []
        for turns, opened in (([user], True), ([user, assistant], False), ([user, assistant, user], True)):
            try:
                text = self._template.render(messages=turns, add_generation_prompt=opened, bos_token="", eos_token="")
            except Exception as exc:  # a template's own raise_exception, or any error it makes
                raise ConfigError(f"chat template {self.name}: cannot write a user and an assistant turn ({exc})") from None
            written.append(text)
            chunks = text.split(_PROBE)
            # Between consecutive turns, and after the last when the model's turn is opened.
            for boundary in chunks[1:] if opened else chunks[1:-1]:
                boundaries.append(boundary)
                if not _MARKER.search(boundary):
                    raise ConfigError(
                        f"chat template {self.name}: the text between two turns ({boundary!r}) holds no special "
                        "token (<name>, <|name|>, [NAME]), so a caller could write it and open a turn of its own"
                    )
        self.boundaries = tuple(dict.fromkeys(boundaries))
        return set(_MARKER.findall("\n".join(written).replace(_PROBE, "\n")))

    def require_control_tokens(self, tokens) -> None:
        """Refuse this template for a model unless every boundary between turns holds one of the
        model's control ``tokens``: markers the tokenizer reads as plain text (another family's,
        or an ordinary tag) mark nothing a caller could not write."""
        known = {t for t in tokens if len(t) > 1}
        for boundary in self.boundaries:
            if not any(token in boundary for token in known):
                raise ConfigError(
                    f"chat template {self.name}: the text between two turns ({boundary!r}) holds none of the model's "
                    "control tokens, so the model reads it as plain text that a caller could write too; use the "
                    "model's own template"
                )

    def add_markers(self, texts) -> None:
        """Defuse these texts in turn text too: an engine's control tokens, which its tokenizer
        reads as such wherever they appear in the prompt. A text shorter than two characters, or
        holding the joiner, is no marker: breaking it could not keep it from being found again."""
        self.markers = self.markers | {t for t in texts if len(t) > 1 and not t.isspace() and _JOINER not in t}
        # A trie of the markers, so finding those that start at a place costs at most the
        # longest partial match there, however many markers share a first character.
        trie: dict = {}
        for marker in self.markers:
            node = trie
            for character in marker:
                node = node.setdefault(character, {})
            node[_END] = True
        self._trie = trie
        self._starts = re.compile("[" + re.escape("".join(trie)) + "]") if trie else None

    def _marker_at(self, text: str, i: int) -> bool:
        """Whether a marker starts at ``text[i]``."""
        node, j, end = self._trie[text[i]], i + 1, len(text)
        while _END not in node:
            if j == end:
                return False
            node = node.get(text[j])
            if node is None:
                return False
            j += 1
        return True

    def defuse(self, text: str) -> str:
        """``text`` with every marker in it broken by a word joiner after its first character.
        One pass is enough: a marker is at least two characters without the joiner, so a
        joiner inserted cannot make a new one."""
        if self._starts is None:
            return text
        pieces, at = [], 0
        for found in self._starts.finditer(text):
            i = found.start()
            if self._marker_at(text, i):
                pieces += [text[at : i + 1], _JOINER]
                at = i + 1
        return "".join(pieces) + text[at:] if pieces else text

    def render(self, turns: Sequence[Turn], add_generation_prompt: bool = True) -> str:
        """The turns as the model reads them; with ``add_generation_prompt`` the model's turn is
        opened for it to write."""
        messages = [{"role": role, "content": self.defuse(text)} for role, text in turns]
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
        """The shipped template of the family a model's architecture or path names, if any:
        a word of it that begins with the family's name (``Qwen2.5-7B``, ``gemma3``), and none
        that names a family with no shipped template."""
        words = re.findall(r"[a-z]+", description.lower())
        if any(word.startswith(UNSHIPPED_FAMILIES) for word in words):
            return None
        for family, name in FAMILIES.items():
            if any(word.startswith(family) for word in words):
                return cls.named(name)
        return None


def with_known_control_tokens(template: ChatTemplate) -> ChatTemplate:
    """``template`` with the common families' control tokens defused in turn text too, for an
    engine that has no vocabulary to name its own (SGLang tokenizes the text it is sent, with
    special tokens parsed)."""
    lines = KNOWN_CONTROL_TOKENS.read_text().splitlines()
    template.add_markers(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    return template
