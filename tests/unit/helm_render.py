"""Renders helm/raybatch without helm: a small implementation of the part of Go's
text/template (and of Helm's and Sprig's functions) the chart uses. Run as a script it
prints the chart's RayService with its default values, which is cluster/rayservice.yaml:

    PYTHONPATH=. .venv/bin/python tests/unit/helm_render.py > cluster/rayservice.yaml

What it implements, as Go and Helm behave:
- actions `{{ }}` with `{{-`/`-}}` trimming and `{{/* */}}` comments;
- if / else if / else, with / else, range (lists; maps in sorted key order; `$k, $v :=`),
  define / include, `$` and `$var :=`;
- `.a.b` on maps: a missing key is nil (printed as nothing, as Helm replaces
  "<no value>"), and a field of nil is an error, as in Go;
- functions: include, toYaml, indent, nindent, trim, quote, default, required, fail, eq, ne,
  not, and, or, dict; `.Files.Get`.
Anything else raises TemplateError, so a template that leaves this subset fails the
tests instead of rendering wrongly. Not implemented: whitespace-exact toYaml (Go's yaml
and PyYAML may quote or wrap differently; parsed output is the same).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "raybatch"


class TemplateError(Exception):
    """The template is wrong or uses something this renderer does not implement."""


ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+(?:\.\d+)?)|(?P<assign>:=)|(?P<punct>[|(),])'
    r"|(?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)|(?P<field>(?:\.[A-Za-z0-9_]+)+|\.)"
    r"|(?P<ident>[A-Za-z_][A-Za-z0-9_]*))"
)


def _segments(text: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) in order, with `{{-`/`-}}` trimming applied."""
    segments: list[tuple[str, str]] = []
    position, trim_next = 0, False
    for match in ACTION.finditer(text):
        before = text[position:match.start()]
        if trim_next:
            before = before.lstrip()
        if match.group(1):
            before = before.rstrip()
        segments.append(("text", before))
        body = match.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            segments.append(("action", body))
        position, trim_next = match.end(), bool(match.group(3))
    rest = text[position:]
    segments.append(("text", rest.lstrip() if trim_next else rest))
    return segments


def _tokens(expression: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    expression = expression.strip()
    while position < len(expression):
        match = TOKEN.match(expression, position)
        if not match or match.end() == position:
            raise TemplateError(f"cannot parse {expression!r} at {position}")
        tokens.append((match.lastgroup, match.group(match.lastgroup)))
        position = match.end()
    return tokens


def _parse_pipeline(tokens: list, position: int = 0) -> tuple[list, int]:
    """A pipeline: commands separated by `|`; a command: operands (the first may name a
    function); an operand may be a parenthesised pipeline."""
    commands, command = [], []
    while position < len(tokens):
        kind, value = tokens[position]
        if value == ")":
            break
        if value == "|":
            commands.append(command)
            command = []
        elif value == "(":
            inner, position = _parse_pipeline(tokens, position + 1)
            command.append(("pipeline", inner))
        else:
            command.append((kind, value))
        position += 1
    commands.append(command)
    if any(not c for c in commands):
        raise TemplateError("empty command in pipeline")
    return commands, position


def _parse(segments: list, position: int, defines: dict) -> tuple[list, int, str]:
    """Nodes up to an `end`/`else` (returned as the stopper) or the end of the text."""
    nodes: list = []
    while position < len(segments):
        kind, body = segments[position]
        position += 1
        if kind == "text":
            nodes.append(("text", body))
            continue
        word = body.split(None, 1)[0] if body else ""
        rest = body[len(word):].strip()
        if word in ("end", "else"):
            return nodes, position, body
        if word in ("if", "with", "range"):
            branches, otherwise = [], []
            condition = rest
            while True:
                inner, position, stopper = _parse(segments, position, defines)
                branches.append((condition, inner))
                if stopper == "end":
                    break
                if stopper == "else":
                    otherwise, position, stopper = _parse(segments, position, defines)
                    if stopper != "end":
                        raise TemplateError(f"{word}: expected end, got {stopper!r}")
                    break
                if word == "if" and stopper.startswith("else if "):
                    condition = stopper[len("else if "):]
                    continue
                raise TemplateError(f"unsupported {stopper!r} in {word}")
            nodes.append((word, branches, otherwise))
        elif word == "define":
            name = json.loads(rest)
            inner, position, stopper = _parse(segments, position, defines)
            if stopper != "end":
                raise TemplateError(f"define {name}: expected end")
            defines[name] = inner
        elif word in ("template", "block", "break", "continue"):
            raise TemplateError(f"{word} is not implemented")
        else:
            nodes.append(("output", body))
    return nodes, position, ""


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, (list, dict)) and not value)


def _printed(value: Any) -> str:
    """Go's %v for what values hold; nil prints nothing (Helm drops "<no value>")."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (str, int, float)):
        return str(value)
    raise TemplateError(f"printing a {type(value).__name__} directly; use toYaml")


def _as_helm_values(value: Any) -> Any:
    """Helm reads values through JSON: a whole float such as 2.0 is the number 2."""
    if isinstance(value, dict):
        return {k: _as_helm_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_helm_values(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _to_yaml(value: Any) -> str:
    text = yaml.safe_dump(_as_helm_values(value), sort_keys=True, default_flow_style=False, width=1 << 30)
    return text.removesuffix("\n").removesuffix("...").removesuffix("\n")


def _indent(spaces: int, text: str) -> str:
    pad = " " * int(spaces)
    return pad + text.replace("\n", "\n" + pad)


class Renderer:
    def __init__(self, chart: Path = CHART, values: dict | None = None, release: str = "raybatch",
                 namespace: str = "default"):
        self.chart = chart
        self.defines: dict[str, list] = {}
        self.templates: dict[str, list] = {}
        for path in sorted((chart / "templates").iterdir()):
            nodes, _, stopper = _parse(_segments(path.read_text()), 0, self.defines)
            if stopper:
                raise TemplateError(f"{path.name}: unexpected {stopper!r}")
            self.templates[path.name] = nodes
        chart_meta = yaml.safe_load((chart / "Chart.yaml").read_text())
        self.root = {
            "Values": values if values is not None else yaml.safe_load((chart / "values.yaml").read_text()),
            "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
            "Chart": {"Name": chart_meta["name"], "Version": chart_meta["version"],
                      "AppVersion": chart_meta.get("appVersion")},
            "Files": {"Get": lambda name: (chart / name).read_text()},
        }

    def render(self, name: str) -> str:
        return self._run(self.templates[name], self.root, {"$": self.root})

    def render_all(self) -> dict[str, str]:
        """Every manifest Helm renders (not `_` files, not NOTES.txt), by file name."""
        return {name: self.render(name) for name in self.templates
                if not name.startswith("_") and name != "NOTES.txt"}

    # ------------------------------------------------------------------ evaluation

    def _run(self, nodes: list, dot: Any, variables: dict) -> str:
        out = []
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "output":
                body = node[1]
                declaration = re.match(r"(\$\w+)\s*:=\s*(.*)$", body, re.DOTALL)
                if declaration:
                    variables[declaration.group(1)] = self._pipeline(declaration.group(2), dot, variables)
                else:
                    out.append(_printed(self._pipeline(body, dot, variables)))
            elif kind == "if":
                for condition, inner in node[1]:
                    if _truthy(self._pipeline(condition, dot, variables)):
                        out.append(self._run(inner, dot, dict(variables)))
                        break
                else:
                    out.append(self._run(node[2], dot, dict(variables)))
            elif kind == "with":
                ((expression, inner),) = node[1]
                value = self._pipeline(expression, dot, variables)
                out.append(self._run(inner, value, dict(variables)) if _truthy(value)
                           else self._run(node[2], dot, dict(variables)))
            elif kind == "range":
                ((expression, inner),) = node[1]
                names, _, expression = expression.rpartition(":=")
                names = [n.strip() for n in names.split(",")] if names.strip() else []
                items = self._pipeline(expression, dot, variables)
                pairs = (sorted(items.items()) if isinstance(items, dict)
                         else list(enumerate(items or [])))
                if not pairs:
                    out.append(self._run(node[2], dot, dict(variables)))
                for key, value in pairs:
                    scope = dict(variables)
                    if len(names) == 2:
                        scope[names[0]], scope[names[1]] = key, value
                    elif names:
                        scope[names[0]] = value
                    out.append(self._run(inner, value, scope))
        return "".join(out)

    def _pipeline(self, expression: str, dot: Any, variables: dict) -> Any:
        commands, _ = _parse_pipeline(_tokens(expression))
        return self._commands(commands, dot, variables)

    def _commands(self, commands: list, dot: Any, variables: dict) -> Any:
        piped, has_piped = None, False
        for command in commands:
            head_kind, head = command[0]
            if head_kind == "ident" and head not in ("true", "false", "nil"):
                args = [self._operand(operand, dot, variables) for operand in command[1:]]
                piped = self._call(head, args + ([piped] if has_piped else []))
            else:
                value = self._operand(command[0], dot, variables)
                if callable(value):  # a method such as .Files.Get
                    args = [self._operand(operand, dot, variables) for operand in command[1:]]
                    value = value(*args, *([piped] if has_piped else []))
                elif len(command) > 1 or has_piped:
                    raise TemplateError(f"cannot call {head!r}")
                piped = value
            has_piped = True
        return piped

    def _operand(self, operand: tuple, dot: Any, variables: dict) -> Any:
        kind, value = operand
        if kind == "pipeline":
            return self._commands(value, dot, variables)
        if kind == "str":
            return json.loads(value)
        if kind == "num":
            return float(value) if "." in value else int(value)
        if kind == "ident":
            return {"true": True, "false": False, "nil": None}[value]
        if kind == "var":
            name, *path = value.split(".")
            if name not in variables:
                raise TemplateError(f"undefined variable {name}")
            return self._fields(variables[name], path, value)
        if kind == "field":
            return self._fields(dot, value.split(".")[1:] if value != "." else [], value)
        raise TemplateError(f"unexpected {value!r}")

    @staticmethod
    def _fields(value: Any, path: list[str], expression: str) -> Any:
        for name in path:
            if value is None:
                raise TemplateError(f"{expression}: nil pointer evaluating .{name}")
            if not isinstance(value, dict):
                raise TemplateError(f"{expression}: .{name} of a {type(value).__name__}")
            value = value.get(name)
        return value

    def _call(self, name: str, args: list) -> Any:
        if name == "include":
            template, data = args
            if template not in self.defines:
                raise TemplateError(f"no template {template!r}")
            # As in Go, `$` inside a template is the data it was called with.
            return self._run(self.defines[template], data, {"$": data})
        functions = {
            "toYaml": lambda value: _to_yaml(value),
            "indent": lambda spaces, text: _indent(spaces, text),
            "nindent": lambda spaces, text: "\n" + _indent(spaces, text),
            "trim": lambda text: _printed(text).strip(),
            "quote": lambda *values: " ".join(json.dumps(_printed(v)) for v in values if v is not None),
            "default": lambda fallback, value=None: value if _truthy(value) else fallback,
            "eq": lambda a, *others: any(a == b for b in others),
            "ne": lambda a, b: a != b,
            "not": lambda value: not _truthy(value),
            "and": lambda *values: next((v for v in values if not _truthy(v)), values[-1]),
            "or": lambda *values: next((v for v in values if _truthy(v)), values[-1]),
            "dict": lambda *pairs: {pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)},
        }
        if name == "required":
            message, value = args
            if value is None or value == "":
                raise TemplateError(message)
            return value
        if name == "fail":
            raise TemplateError(args[0])
        if name not in functions:
            raise TemplateError(f"function {name!r} is not implemented")
        return functions[name](*args)


def documents(text: str) -> list[dict]:
    """The YAML documents of a rendered file, empty ones dropped (as Helm does)."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


if __name__ == "__main__":
    sys.stdout.write(Renderer().render("rayservice.yaml"))
