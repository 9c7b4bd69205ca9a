"""The lists' `filter` (the part of AIP-160, google.aip.dev/160, that fits our records)
and `orderBy` (AIP-132: `field [asc|desc], ...`).

A filter is parsed into a predicate before any record is read, so an expression we do
not support is a 400 that says what is, never a silently wrong page. Grammar (AIP-160's,
without functions, traversal or bare-word search):

    expression  = sequence { "AND" sequence }
    sequence    = factor { factor }                 (juxtaposition means AND)
    factor      = term { "OR" term }                (OR binds tighter than AND)
    term        = [ "NOT" | "-" ] simple
    simple      = field comparator value | "(" expression ")"
    comparator  = "=" | "!=" | "<" | "<=" | ">" | ">=" | ":"

Values are bare words or quoted strings. `:` is "has": a substring of a string field,
`field:*` that it is set. `=` on a string takes `*` wildcards. Times are RFC 3339.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from raybatch.exceptions import InvalidArgument

Record = Any  # a pydantic resource; fields are read by their snake_case names
Predicate = Callable[[Record], bool]

OPERATORS = ("<=", ">=", "!=", "=", "<", ">", ":")
# After a comparator, a bare value runs to the next space or parenthesis, so that an
# unquoted time (`createTime>2025-01-01T00:00:00Z`) keeps its colons.
VALUE = re.compile(r"\s*(?P<word>[^\s()\"']+)")
TOKEN = re.compile(r"""\s*(?:(?P<paren>[()])|(?P<op><=|>=|!=|=|<|>|:)|"(?P<dq>(?:[^"\\]|\\.)*)"|'(?P<sq>(?:[^'\\]|\\.)*)'|(?P<word>[^\s()<>=!:"']+))""")
KEYWORDS = {"AND", "OR", "NOT"}


class Kind(enum.Enum):
    STRING = "string"
    TIME = "time"
    ENUM = "enum"
    REFERENCE = "reference"  # a resource name; a bare ID matches its last segment


@dataclass(frozen=True)
class Field:
    """A field a list may be filtered and ordered by. For an enum, `known` is every value
    the Fireworks API defines (naming one that raybatch never reaches matches nothing);
    `prefix` may be left out by the user (`RUNNING` for `JOB_STATE_RUNNING`)."""

    kind: Kind
    known: frozenset[str] = frozenset()
    prefix: str = ""


def _camel_to_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _snake_to_camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _help(fields: dict[str, Field]) -> str:
    return (f"filter on {', '.join(fields)} with =, !=, <, <=, >, >=, : (has), combined with AND, OR, "
            "NOT and parentheses, e.g. 'state=JOB_STATE_COMPLETED AND createTime>\"2025-01-01T00:00:00Z\"'")


def _field(name: str, fields: dict[str, Field], what: str, text: str) -> str:
    """The camelCase name of a field given in either case (`create_time`, `createTime`)."""
    camel = _snake_to_camel(name)
    if camel not in fields:
        raise InvalidArgument(f"unsupported {what} {text!r}: unknown field {name!r}; {_help(fields)}"
                              if what == "filter" else
                              f"unsupported {what} {text!r}: unknown field {name!r}; order by {', '.join(fields)}, "
                              "each optionally followed by asc or desc, separated by commas")
    return camel


# ------------------------------------------------------------------------- parsing


class _Parser:
    def __init__(self, text: str, fields: dict[str, Field]):
        self.text, self.fields = text, fields
        self.tokens = self._tokenize(text)
        self.at = 0

    def fail(self, why: str) -> InvalidArgument:
        return InvalidArgument(f"unsupported filter {self.text!r}: {why}; {_help(self.fields)}")

    def _tokenize(self, text: str) -> list[tuple[str, str]]:
        tokens, at = [], 0
        while at < len(text):
            if not text[at:].strip():
                break
            after_operator = bool(tokens) and tokens[-1][0] == "op"
            match = (after_operator and VALUE.match(text, at)) or TOKEN.match(text, at)
            if not match:
                raise self.fail(f"cannot read it at {text[at:].strip()[:20]!r}")
            at = match.end()
            kind = match.lastgroup
            value = match.group(kind)
            if kind in ("dq", "sq"):
                tokens.append(("value", re.sub(r"\\(.)", r"\1", value)))
            elif kind == "word" and value in KEYWORDS:
                tokens.append((value, value))
            else:
                tokens.append((kind, value))
        return tokens

    def peek(self) -> Optional[tuple[str, str]]:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise self.fail("it ends too early")
        self.at += 1
        return token

    def parse(self) -> Predicate:
        predicate = self.expression()
        if self.peek() is not None:
            raise self.fail(f"unexpected {self.peek()[1]!r}")
        return predicate

    def expression(self) -> Predicate:
        parts = [self.sequence()]
        while self.peek() and self.peek()[0] == "AND":
            self.take()
            parts.append(self.sequence())
        return parts[0] if len(parts) == 1 else (lambda r, ps=parts: all(p(r) for p in ps))

    def sequence(self) -> Predicate:
        parts = [self.factor()]
        while self.peek() and self.peek()[0] not in ("AND", "OR") and self.peek() != ("paren", ")"):
            parts.append(self.factor())
        return parts[0] if len(parts) == 1 else (lambda r, ps=parts: all(p(r) for p in ps))

    def factor(self) -> Predicate:
        parts = [self.term()]
        while self.peek() and self.peek()[0] == "OR":
            self.take()
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else (lambda r, ps=parts: any(p(r) for p in ps))

    def term(self) -> Predicate:
        token = self.peek()
        if token and (token[0] == "NOT" or token == ("word", "-")):
            self.take()
            inner = self.simple()
            return lambda r: not inner(r)
        if token and token[0] == "word" and token[1].startswith("-") and len(token[1]) > 1:
            self.tokens[self.at] = ("word", token[1][1:])  # `-state=X`: the minus is NOT
            inner = self.simple()
            return lambda r: not inner(r)
        return self.simple()

    def simple(self) -> Predicate:
        token = self.take()
        if token == ("paren", "("):
            inner = self.expression()
            if self.take() != ("paren", ")"):
                raise self.fail("a parenthesis is not closed")
            return inner
        if token[0] != "word":
            raise self.fail(f"expected a field name, found {token[1]!r}")
        name = _field(token[1], self.fields, "filter", self.text)
        operator = self.peek()
        self.at += 1
        if operator is None or operator[0] != "op":
            raise self.fail(f"{token[1]!r} needs a comparison (a bare word searches nothing here)")
        value = self.take()
        if value[0] not in ("word", "value"):
            raise self.fail(f"expected a value after {token[1]}{operator[1]}")
        return self.restriction(name, operator[1], value[1])

    def restriction(self, name: str, op: str, value: str) -> Predicate:
        field = self.fields[name]
        attribute = _camel_to_snake(name)

        def read(record: Record) -> Any:
            got = getattr(record, attribute, None)
            return got.value if isinstance(got, enum.Enum) else got

        if op == ":" and value == "*":
            return lambda r: read(r) not in (None, "")
        if field.kind is Kind.ENUM:
            if op not in ("=", "!=", ":"):
                raise self.fail(f"{name} takes = and != only")
            wanted = value if value in field.known else field.prefix + value
            if wanted not in field.known:
                raise self.fail(f"{value!r} is not a {name}; one of {', '.join(sorted(field.known))}")
            return (lambda r: read(r) != wanted) if op == "!=" else (lambda r: read(r) == wanted)
        if field.kind is Kind.TIME:
            if op == ":":
                raise self.fail(f"{name} takes =, !=, <, <=, >, >=")
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                raise self.fail(f"{value!r} is not an RFC 3339 time such as 2025-01-31T00:00:00Z") from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return _compare(read, op, moment)
        if field.kind is Kind.REFERENCE and "/" not in value:
            def read_id(record: Record) -> Optional[str]:
                got = read(record)
                return got.rsplit("/", 1)[-1] if got else got

            return _string(read_id, op, value)
        return _string(read, op, value)


def _compare(read: Callable[[Record], Any], op: str, value: Any) -> Predicate:
    tests = {
        "=": lambda got: got == value, "!=": lambda got: got != value,
        "<": lambda got: got is not None and got < value, "<=": lambda got: got is not None and got <= value,
        ">": lambda got: got is not None and got > value, ">=": lambda got: got is not None and got >= value,
    }
    test = tests[op]
    return lambda r: test(read(r))


def _string(read: Callable[[Record], Any], op: str, value: str) -> Predicate:
    if op == ":":
        return lambda r: value in (read(r) or "")
    if op in ("=", "!=") and "*" in value:
        pattern = re.compile(".*".join(re.escape(part) for part in value.split("*")), re.DOTALL)
        matches = (lambda r: bool(pattern.fullmatch(read(r) or "")))
        return matches if op == "=" else (lambda r: not matches(r))
    return _compare(read, op, value)


def parse_filter(text: Optional[str], fields: dict[str, Field]) -> Optional[Predicate]:
    """The predicate of an AIP-160 filter over `fields`, or None for no filter."""
    if not text or not text.strip():
        return None
    return _Parser(text, fields).parse()


# ------------------------------------------------------------------------ ordering

# Old spellings of createTime that earlier raybatch clients send.
ORDER_ALIASES = {"created_time": "createTime", "createdTime": "createTime"}


def parse_order(text: Optional[str], fields: dict[str, Field]) -> list[tuple[str, bool]]:
    """`orderBy` → [(snake_case attribute, descending)], in priority order."""
    if not text or not text.strip():
        return []
    keys = []
    for part in text.split(","):
        words = part.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
            raise InvalidArgument(f"unsupported orderBy {text!r}: use fields separated by commas, each optionally "
                                  f"followed by asc or desc (fields: {', '.join(fields)})")
        name = _field(ORDER_ALIASES.get(words[0], words[0]), fields, "orderBy", text)
        keys.append((_camel_to_snake(name), len(words) == 2 and words[1].lower() == "desc"))
    return keys


def ordered(records: list, keys: list[tuple[str, bool]], default: list[tuple[str, bool]]) -> list:
    """`records` sorted by `keys` (then `default`, then name), a missing value first."""
    result = sorted(records, key=lambda r: r.name)
    for attribute, descending in reversed((keys or []) + default):
        def key(record, attribute=attribute):
            got = getattr(record, attribute, None)
            got = got.value if isinstance(got, enum.Enum) else got
            return (got is not None, got)

        result.sort(key=key, reverse=descending)
    return result
