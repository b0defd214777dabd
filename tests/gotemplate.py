"""A small renderer for the part of Go's text/template that Ollama's chat templates use, for the tests.

Ollama renders a Modelfile's TEMPLATE with Go's text/template (https://pkg.go.dev/text/template). The
tests render minilora's templates with this to compare them with the model's Jinja template as transformers
renders it. What it knows, with Go's meaning:
- text, and actions {{ ... }}; "{{- " trims all white space before the action, " -}}" all after it;
- .Field and . (the current value), "string" literals with Go's escapes (\\n, \\t, \\", \\\\);
- calls: eq a b [c...] (a equals any of the rest), ne, not, and, or, len;
- {{ if }} / {{ else if }} / {{ else }} / {{ end }}, {{ range pipeline }} (dot is each element in turn);
- truth as Go has it: false, 0, "", nil and empty lists are false.
Anything else raises, so a template that needs more fails the test instead of rendering wrongly.
`ollama_render` adds what Ollama does before the template (server/routes.go, template/template.go).
"""
from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(- )?(.*?)( -)?\}\}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+')
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "r": "\r"}


def _parse(source: str) -> list:
    """source -> a tree: str | ("expr", tokens) | ("if", [(cond, body), ...], else_body) | ("range", expr, body)."""
    pieces, pos = [], 0
    for m in _ACTION.finditer(source):
        pieces.append(["text", source[pos:m.start()]])
        pieces.append(["action", m.group(2).strip(), bool(m.group(1)), bool(m.group(3))])
        pos = m.end()
    pieces.append(["text", source[pos:]])
    for i, p in enumerate(pieces):  # trim markers act on the neighbouring text
        if p[0] == "action":
            if p[2]:
                pieces[i - 1][1] = pieces[i - 1][1].rstrip(" \t\r\n")
            if p[3]:
                pieces[i + 1][1] = pieces[i + 1][1].lstrip(" \t\r\n")
    stream = iter(pieces)

    def block(stop):
        nodes = []
        for p in stream:
            if p[0] == "text":
                nodes.append(p[1])
                continue
            words = p[1].split(None, 1)
            head, rest = (words + [""])[:2] if words else ("", "")
            if head in stop or (head == "else" and "else" in stop):
                return nodes, p[1]
            if head == "if":
                branches, cond = [], rest
                while True:
                    body, ender = block({"else", "end"})
                    branches.append((_TOKEN.findall(cond), body))
                    if ender == "end":
                        nodes.append(("if", branches, []))
                        break
                    if ender.startswith("else if "):
                        cond = ender[len("else if "):]
                        continue
                    otherwise, _ = block({"end"})
                    nodes.append(("if", branches, otherwise))
                    break
            elif head == "range":
                body, _ = block({"end"})
                nodes.append(("range", _TOKEN.findall(rest), body))
            else:
                nodes.append(("expr", _TOKEN.findall(p[1])))
        if stop:
            raise ValueError(f"template ends inside a block (expected {stop})")
        return nodes, None

    return block(set())[0]


def _truth(v) -> bool:
    return not (v is None or v is False or v == 0 or v == "" or v == [] or v == {})


def _eval(tokens: list[str], dot, root):
    def value(tok):
        if tok.startswith('"'):
            return re.sub(r"\\(.)", lambda m: _ESCAPES[m.group(1)], tok[1:-1])
        if tok == ".":
            return dot
        if tok.startswith("."):
            v = dot
            for field in tok[1:].split("."):
                v = v.get(field) if isinstance(v, dict) else None  # Ollama: missingkey=zero
            return v
        if tok.startswith("$."):
            return _eval(["." + tok[2:]], root, root)
        raise ValueError(f"gotemplate: {tok!r} is not supported")

    def call(args):
        if not args:
            raise ValueError("gotemplate: empty pipeline")
        fn, rest = args[0], [evaluate(a) for a in args[1:]]
        funcs = {"eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truth(a),
                 "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]),
                 "or": lambda *a: next((x for x in a if _truth(x)), a[-1]), "len": len}
        if isinstance(fn, str) and fn in funcs:
            return funcs[fn](*rest)
        if rest:
            raise ValueError(f"gotemplate: {fn!r} is not a function")
        return evaluate(fn)

    def evaluate(a):
        return call(a) if isinstance(a, list) else value(a)

    def group(toks):  # "(" ... ")" -> nested lists
        out, stack = [], []
        for t in toks:
            if t == "(":
                stack.append(out)
                out = []
            elif t == ")":
                inner, out = out, stack.pop()
                out.append(inner)
            else:
                out.append(t)
        return out

    return call(group(tokens))


def render(source: str, data: dict) -> str:
    def run(nodes, dot):
        out = []
        for n in nodes:
            if isinstance(n, str):
                out.append(n)
            elif n[0] == "expr":
                v = _eval(n[1], dot, data)
                out.append("" if v is None else str(v))
            elif n[0] == "if":
                for cond, body in n[1]:
                    if _truth(_eval(cond, dot, data)):
                        out.append(run(body, dot))
                        break
                else:
                    out.append(run(n[2], dot))
            elif n[0] == "range":
                for item in _eval(n[1], dot, data) or []:
                    out.append(run(n[2], item))
        return "".join(out)

    return run(_parse(source), data)


def ollama_render(template: str, messages: list[dict], system: str | None = None) -> str:
    """The prompt Ollama builds for a chat request: the Modelfile's SYSTEM goes first when the conversation
    does not start with a system message (server/routes.go), consecutive messages of one role are joined
    with a blank line (template.go, collate), and the template sees {"Messages": [{"Role", "Content"}...]}."""
    msgs = [dict(m) for m in messages]
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    collated = []
    for m in msgs:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    systems = [m["Content"] for m in collated if m["Role"] == "system"]
    return render(template, {"Messages": collated, "System": "\n\n".join(systems), "Response": ""})
