"""The tokenizer: `tokenizers` for the ids, jinja2 for the chat template.

Reads what a Hugging Face checkpoint folder ships:
- `tokenizer.json`: the fast tokenizer (vocab, merges, pre-tokenizer, post-processor);
- `tokenizer_config.json`: bos/eos/pad token strings, and usually `chat_template`;
- `chat_template.jinja`: where transformers 5 keeps the template instead.

The chat template is rendered the way transformers' `apply_chat_template`
does it (a sandboxed jinja2 environment with `trim_blocks`, `lstrip_blocks`,
`raise_exception`, a non-escaping `tojson`, and the special-token strings as
variables), so rendered text and ids match; tests/test_tokenizer.py checks it.

`{% generation %}...{% endgeneration %}` is the tag transformers' templates use to mark what the
assistant writes (trl's training templates, and minilora/templates/, carry it). `render_chat`
returns those spans as character offsets; chat.py turns them into labels. The tag is implemented by
wrapping the block's output in two private-use characters (GEN_OPEN, GEN_CLOSE) that are then cut
out of the text again, which needs no knowledge of how jinja2 streams its output.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _FastTokenizer


def _token_str(value) -> str | None:
    """tokenizer_config stores special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# Private-use code points (U+E000, U+E001): no text in a data set has a reason to hold them.
GEN_OPEN, GEN_CLOSE = "\ue000", "\ue001"


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}` renders as GEN_OPEN + body + GEN_CLOSE."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        return GEN_OPEN + caller() + GEN_CLOSE


def compile_chat_template(source: str) -> jinja2.Template:
    """Raises jinja2.TemplateSyntaxError (with .lineno) for a template that does not parse."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: minilora needs a fast tokenizer (tokenizer.json) in the model folder.")
        self.folder = folder
        self.tk = _FastTokenizer.from_file(str(path))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.config = cfg
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.pad_token = _token_str(cfg.get("pad_token"))
        self.unk_token = _token_str(cfg.get("unk_token"))
        template = cfg.get("chat_template")
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = None
        self._compiled = None
        if template:
            self.set_chat_template(template)

    def set_chat_template(self, source: str):
        """Use `source` (Jinja text) as the chat template from now on (--chat-template, chat.py's training
        variants). Raises jinja2.TemplateSyntaxError if it does not parse; the caller names the file."""
        self._compiled = compile_chat_template(source)
        self.chat_template = source

    # -- ids ---------------------------------------------------------------
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tk.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids as `AutoTokenizer(text)["input_ids"]` gives them (the post-processor may add BOS)."""
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ----------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The rendered conversation text. Tokenize it with `encode(text, add_special_tokens=False)`,
        as transformers does, because templates write their own BOS."""
        return self.render_chat(messages, add_generation_prompt, **kwargs)[0]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    **kwargs) -> tuple[str, list[tuple[int, int]]]:
        """(text, spans): the rendered conversation, and the [start, end) character offsets in it of each
        `{% generation %}` block, in order ([] for a template without the tag)."""
        if self._compiled is None:
            raise ValueError(
                f"{self.folder}: this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja); "
                "use a plain-text template such as --template alpaca instead."
            )
        for m in messages:
            for v in m.values() if isinstance(m, dict) else ():
                if isinstance(v, str) and (GEN_OPEN in v or GEN_CLOSE in v):
                    raise ValueError("a message holds U+E000 or U+E001, the private-use characters minilora "
                                     "marks {% generation %} spans with; remove them from the data.")
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                   "pad_token": self.pad_token, "unk_token": self.unk_token}
        raw = self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **special, **kwargs)
        text, spans, start, n = [], [], None, 0
        for piece in re.split(f"([{GEN_OPEN}{GEN_CLOSE}])", raw):  # text, marker, text, marker, ...
            if piece == GEN_OPEN:
                if start is not None:
                    raise ValueError("the chat template nests {% generation %} blocks; spans cannot nest.")
                start = n
            elif piece == GEN_CLOSE:
                spans.append((start, n))
                start = None
            else:
                text.append(piece)
                n += len(piece)
        return "".join(text), spans
