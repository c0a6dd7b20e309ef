"""``Filter.where``: a small SQL boolean expression evaluated safely over cohort metadata.

The text is tokenised and parsed here into an expression tree and evaluated with
``pyarrow.compute`` over the snapshot's metadata table; it never reaches a SQL engine, so
nothing in it can read files, call functions or run statements. The grammar is the
boolean part of SQL that researchers use to narrow a search::

    site = 'north' AND manufacturer IN ('SIEMENS', 'GE') AND study_day >= 30
    NOT (kernel LIKE 'B%') OR kernel IS NULL
    labels['stage'] = 'III' AND values['tumor_volume_ml'] BETWEEN 10 AND 40

- comparisons ``= == != <> < <= > >=`` between a column and a literal (or two columns);
  ``[NOT] IN (...)``, ``[NOT] BETWEEN a AND b``, ``[NOT] LIKE / ILIKE 'pat%'``,
  ``IS [NOT] NULL``; ``AND``, ``OR``, ``NOT`` and parentheses; a boolean column alone.
- literals: ``'text'`` (``''`` escapes a quote), numbers, ``TRUE``, ``FALSE``, ``NULL``.
- columns: any metadata column by name (case-insensitive; ``"quoted"`` for odd names);
  outcome maps by key: ``labels['histology']``, ``values['tumor_volume_ml']``.
- SQL's three-valued logic: a comparison with a null is unknown, and unknown rows are
  not selected (``IS NULL`` selects them).
- text columns compared with a number are read as numbers (``kvp >= 100``); values that
  are not numbers count as null.

Any other input raises :class:`FilterError` whose message says where the text goes wrong
or, for an unknown column, lists the columns that exist.
"""

from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexing.errors import FilterError

MAX_WHERE_LENGTH = 4096
MAX_DEPTH = 64
MAX_IN_VALUES = 10_000
MAP_COLUMNS = ("labels", "values")
HIDDEN_COLUMNS = ("row_id",)

_KEYWORDS = {
    "AND",
    "OR",
    "NOT",
    "IN",
    "IS",
    "NULL",
    "TRUE",
    "FALSE",
    "BETWEEN",
    "LIKE",
    "ILIKE",
}
_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<number>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
  | (?P<string>'(?:[^']|'')*')
  | (?P<qident>"(?:[^"]|"")+")
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><>|!=|<=|>=|==|=|<|>)
  | (?P<punct>[(),\[\]-])
    """,
    re.VERBOSE,
)


# --------------------------------------------------------------------------- syntax tree
@dataclass(frozen=True)
class Column:
    name: str
    key: str | None = None  # map element: labels['key']


@dataclass(frozen=True)
class Literal:
    value: Any  # str, int, float, bool or None


@dataclass(frozen=True)
class Compare:
    op: str  # one of = != < <= > >=
    left: Column | Literal
    right: Column | Literal


@dataclass(frozen=True)
class InList:
    operand: Column
    values: tuple[Any, ...]
    negated: bool


@dataclass(frozen=True)
class Between:
    operand: Column
    low: Literal
    high: Literal
    negated: bool


@dataclass(frozen=True)
class Like:
    operand: Column
    pattern: str
    ignore_case: bool
    negated: bool


@dataclass(frozen=True)
class IsNull:
    operand: Column
    negated: bool


@dataclass(frozen=True)
class BoolColumn:
    operand: Column


@dataclass(frozen=True)
class Not:
    operand: Expr


@dataclass(frozen=True)
class BoolOp:
    op: str  # AND / OR
    operands: tuple[Expr, ...]


Expr = Compare | InList | Between | Like | IsNull | BoolColumn | Not | BoolOp


@dataclass(frozen=True)
class _Tok:
    kind: str  # number, string, ident, kw, op, punct, end
    text: str
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise FilterError(
                f"filter: unexpected character {text[pos]!r} at position {pos + 1}; "
                "quote text values with single quotes"
            )
        kind = m.lastgroup or ""
        value = m.group()
        if kind == "ident" and value.upper() in _KEYWORDS:
            tokens.append(_Tok("kw", value.upper(), pos))
        elif kind != "ws":
            tokens.append(_Tok(kind, value, pos))
        pos = m.end()
    tokens.append(_Tok("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    # helpers
    @property
    def tok(self) -> _Tok:
        return self.tokens[self.i]

    def _advance(self) -> _Tok:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def _accept(self, kind: str, text: str | None = None) -> _Tok | None:
        tok = self.tok
        if tok.kind == kind and (text is None or tok.text == text):
            self.i += 1
            return tok
        return None

    def _error(self, expected: str) -> FilterError:
        tok = self.tok
        found = "the end of the filter" if tok.kind == "end" else repr(tok.text)
        return FilterError(f"filter: expected {expected} at position {tok.pos + 1}, found {found}")

    def _expect(self, kind: str, text: str, expected: str) -> None:
        if self._accept(kind, text) is None:
            raise self._error(expected)

    # grammar
    def parse(self) -> Expr:
        expr = self._or()
        if self.tok.kind != "end":
            raise self._error("AND, OR or the end of the filter")
        return expr

    def _or(self) -> Expr:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError(f"filter: nested more than {MAX_DEPTH} levels deep; simplify it")
        parts = [self._and()]
        while self._accept("kw", "OR"):
            parts.append(self._and())
        self.depth -= 1
        return parts[0] if len(parts) == 1 else BoolOp("OR", tuple(parts))

    def _and(self) -> Expr:
        parts = [self._not()]
        while self._accept("kw", "AND"):
            parts.append(self._not())
        return parts[0] if len(parts) == 1 else BoolOp("AND", tuple(parts))

    def _not(self) -> Expr:
        if self._accept("kw", "NOT"):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise FilterError(f"filter: nested more than {MAX_DEPTH} levels deep; simplify it")
            inner = self._not()
            self.depth -= 1
            return Not(inner)
        return self._predicate()

    def _predicate(self) -> Expr:
        if self._accept("punct", "("):
            inner = self._or()
            self._expect("punct", ")", "')'")
            return inner
        left = self._operand()
        tok = self.tok
        if tok.kind == "op":
            self._advance()
            right = self._operand()
            op = {"==": "=", "<>": "!="}.get(tok.text, tok.text)
            return Compare(op, left, right)
        negated = bool(self._accept("kw", "NOT"))
        if self._accept("kw", "IN"):
            return InList(self._column_of(left, "IN"), self._in_values(), negated)
        if self._accept("kw", "BETWEEN"):
            low = self._literal()
            self._expect("kw", "AND", "AND (BETWEEN low AND high)")
            high = self._literal()
            return Between(self._column_of(left, "BETWEEN"), low, high, negated)
        like = self._accept("kw", "LIKE") or self._accept("kw", "ILIKE")
        if like is not None:
            pattern = self._literal()
            if not isinstance(pattern.value, str):
                raise FilterError("filter: LIKE needs a quoted text pattern such as 'B3%'")
            return Like(self._column_of(left, like.text), pattern.value, like.text == "ILIKE", negated)
        if negated:
            raise self._error("IN, BETWEEN or LIKE after NOT")
        if self._accept("kw", "IS"):
            is_not = bool(self._accept("kw", "NOT"))
            self._expect("kw", "NULL", "NULL (IS [NOT] NULL)")
            return IsNull(self._column_of(left, "IS NULL"), is_not)
        if isinstance(left, Column):
            return BoolColumn(left)
        raise self._error("a comparison (=, <>, <, IN, BETWEEN, LIKE, IS NULL)")

    def _column_of(self, operand: Column | Literal, what: str) -> Column:
        if not isinstance(operand, Column):
            raise FilterError(f"filter: {what} needs a column on its left, not a value")
        return operand

    def _operand(self) -> Column | Literal:
        tok = self.tok
        if tok.kind in ("ident", "qident"):
            self._advance()
            name = tok.text if tok.kind == "ident" else tok.text[1:-1].replace('""', '"')
            key = None
            if self._accept("punct", "["):
                key_tok = self._advance()
                if key_tok.kind != "string":
                    raise FilterError(
                        f"filter: {name}[...] needs a quoted key such as {name}['stage']"
                    )
                key = key_tok.text[1:-1].replace("''", "'")
                self._expect("punct", "]", "']'")
            return Column(name, key)
        return self._literal()

    def _literal(self) -> Literal:
        tok = self.tok
        sign = 1
        if tok.kind == "punct" and tok.text == "-":
            self._advance()
            sign = -1
            tok = self.tok
            if tok.kind != "number":
                raise self._error("a number after '-'")
        if tok.kind == "number":
            self._advance()
            text = tok.text
            value: Any = float(text) if any(c in text for c in ".eE") else int(text)
            return Literal(sign * value)
        if tok.kind == "string":
            self._advance()
            return Literal(tok.text[1:-1].replace("''", "'"))
        if tok.kind == "kw" and tok.text in ("TRUE", "FALSE", "NULL"):
            self._advance()
            return Literal({"TRUE": True, "FALSE": False, "NULL": None}[tok.text])
        raise self._error("a column, a quoted text value or a number")

    def _in_values(self) -> tuple[Any, ...]:
        self._expect("punct", "(", "'(' after IN")
        values = [self._literal().value]
        while self._accept("punct", ","):
            values.append(self._literal().value)
            if len(values) > MAX_IN_VALUES:
                raise FilterError(f"filter: IN lists hold at most {MAX_IN_VALUES} values")
        self._expect("punct", ")", "')' or ',' in the IN list")
        return tuple(values)


def parse_where(where: str) -> Expr | None:
    """Parse a ``where`` text into an expression tree; None for an empty filter.

    Raises :class:`FilterError` for bad syntax (with the position) or overlong input.
    """
    if not isinstance(where, str):
        raise FilterError(f"filter: where must be text, not {type(where).__name__}")
    if len(where) > MAX_WHERE_LENGTH:
        raise FilterError(f"filter: where is {len(where)} characters long; the limit is {MAX_WHERE_LENGTH}")
    if not where.strip():
        return None
    return _Parser(where).parse()


# --------------------------------------------------------------------------- evaluation
def _filterable(table: pa.Table, name: str) -> bool:
    """Internal ids, binary payloads (thumbnails) and lists (vectors) are not filterable."""
    typ = table.schema.field(name).type
    unusable = (
        pa.types.is_binary(typ)
        or pa.types.is_large_binary(typ)
        or pa.types.is_fixed_size_binary(typ)
        or pa.types.is_list(typ)
        or pa.types.is_large_list(typ)
        or pa.types.is_fixed_size_list(typ)
    )
    return name not in HIDDEN_COLUMNS and not unusable


def filterable_columns(table: pa.Table) -> list[str]:
    """The column names a filter may use (map columns as ``name['key']``)."""
    names = []
    for name in table.column_names:
        if not _filterable(table, name):
            continue
        typ = table.schema.field(name).type
        names.append(f"{name}['key']" if pa.types.is_map(typ) else name)
    return names


class _Evaluator:
    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.n = table.num_rows
        self._lower: dict[str, list[str]] = {}
        for name in table.column_names:
            if _filterable(table, name):
                self._lower.setdefault(name.casefold(), []).append(name)
        self._numeric_cache: dict[Column, pa.Array] = {}

    def _unknown(self, name: str) -> FilterError:
        return FilterError(
            f"filter: unknown column {name!r}; known columns: "
            + ", ".join(filterable_columns(self.table))
        )

    def column(self, col: Column) -> pa.Array:
        names = self._lower.get(col.name.casefold(), [])
        exact = [n for n in names if n == col.name]
        if len(exact) == 1:
            name = exact[0]
        elif len(names) == 1:
            name = names[0]
        else:
            raise self._unknown(col.name)
        arr = self.table.column(name).combine_chunks()
        typ = arr.type
        if pa.types.is_map(typ):
            if col.key is None:
                raise FilterError(
                    f"filter: {name} holds several outcomes by name; pick one as {name}['key']"
                )
            return pc.map_lookup(arr, pa.scalar(col.key, typ.key_type), "first")
        if col.key is not None:
            raise FilterError(f"filter: {name} is not a map column; drop the ['{col.key}']")
        if pa.types.is_dictionary(typ):
            arr = arr.cast(typ.value_type)
        return arr

    def numeric(self, col: Column) -> pa.Array:
        """A text column read as float64; values that are not numbers become null."""
        cached = self._numeric_cache.get(col)
        if cached is not None:
            return cached
        arr = self.column(col)
        try:
            out = pc.cast(arr, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            out = pa.array([_to_float(v) for v in arr.to_pylist()], pa.float64())
        self._numeric_cache[col] = out
        return out

    def operand(self, x: Column | Literal, other: Column | Literal) -> Any:
        """An array for a column, a scalar for a literal, with the types made comparable."""
        if isinstance(x, Literal):
            if isinstance(other, Column):
                typ = self.column(other).type
                return pa.scalar(_coerce_literal(x.value, typ, other), _literal_type(x.value, typ))
            return pa.scalar(x.value)
        arr = self.column(x)
        if (
            isinstance(other, Literal)
            and isinstance(other.value, int | float)
            and not isinstance(other.value, bool)
            and _is_text(arr.type)
        ):
            return self.numeric(x)
        if isinstance(other, Column):
            otype = self.column(other).type
            if _is_text(arr.type) and _is_number(otype):
                return self.numeric(x)
        return arr

    def eval(self, e: Expr) -> pa.Array:
        if isinstance(e, BoolOp):
            fn = pc.and_kleene if e.op == "AND" else pc.or_kleene
            out = self.eval(e.operands[0])
            for part in e.operands[1:]:
                out = fn(out, self.eval(part))
            return out
        if isinstance(e, Not):
            return pc.invert(self.eval(e.operand))
        if isinstance(e, Compare):
            return self.compare(e.op, e.left, e.right)
        if isinstance(e, InList):
            return self.in_list(e)
        if isinstance(e, Between):
            inside = pc.and_kleene(
                self.compare(">=", e.operand, e.low), self.compare("<=", e.operand, e.high)
            )
            return pc.invert(inside) if e.negated else inside
        if isinstance(e, Like):
            arr = self.column(e.operand)
            if not _is_text(arr.type):
                raise FilterError(f"filter: LIKE works on text columns; {e.operand.name} is {arr.type}")
            out = pc.match_like(arr, e.pattern, ignore_case=e.ignore_case)
            return pc.invert(out) if e.negated else out
        if isinstance(e, IsNull):
            arr = self.column(e.operand)
            nulls = pc.is_null(arr, nan_is_null=True)
            return pc.invert(nulls) if e.negated else nulls
        if isinstance(e, BoolColumn):
            arr = self.column(e.operand)
            if not pa.types.is_boolean(arr.type):
                raise FilterError(
                    f"filter: column {e.operand.name} is {arr.type}, not true/false; "
                    "compare it with a value (e.g. = 'x')"
                )
            return arr
        raise FilterError(f"filter: unsupported expression {e!r}")  # pragma: no cover

    def compare(self, op: str, left: Column | Literal, right: Column | Literal) -> pa.Array:
        if isinstance(left, Literal) and isinstance(right, Literal):
            raise FilterError("filter: a comparison needs at least one column")
        if isinstance(left, Literal):  # value op column -> column (flipped op) value
            flipped = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op, op)
            return self.compare(flipped, right, left)
        a = self.operand(left, right)
        b = self.operand(right, left)
        fn: Callable[[Any, Any], pa.Array] = {
            "=": pc.equal,
            "!=": pc.not_equal,
            "<": pc.less,
            "<=": pc.less_equal,
            ">": pc.greater,
            ">=": pc.greater_equal,
        }[op]
        try:
            return fn(a, b)
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise FilterError(
                f"filter: cannot compare {_describe(left)} with {_describe(right)} ({_first_line(exc)})"
            ) from None

    def in_list(self, e: InList) -> pa.Array:
        arr = self.column(e.operand)
        values = [v for v in e.values if v is not None]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if values and numeric and _is_text(arr.type):
            arr = self.numeric(e.operand)
        try:
            typ = arr.type
            value_set = pa.array(
                [_coerce_literal(v, typ, e.operand) for v in values], _literal_type(values[0] if values else None, typ)
            )
            found = pc.is_in(arr, value_set=value_set)
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise FilterError(
                f"filter: cannot match {e.operand.name} against the IN list ({_first_line(exc)})"
            ) from None
        found = pc.if_else(pc.is_valid(arr), found, pa.scalar(None, pa.bool_()))
        return pc.invert(found) if e.negated else found


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _describe(x: Column | Literal) -> str:
    if isinstance(x, Column):
        return x.name if x.key is None else f"{x.name}['{x.key}']"
    return repr(x.value)


def _to_float(v: Any) -> float | None:
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _is_text(typ: pa.DataType) -> bool:
    return bool(pa.types.is_string(typ) or pa.types.is_large_string(typ))


def _is_number(typ: pa.DataType) -> bool:
    return bool(pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ))


def _literal_type(value: Any, column_type: pa.DataType) -> pa.DataType | None:
    if value is None:
        return column_type
    if _is_number(column_type) and isinstance(value, int | float) and not isinstance(value, bool):
        return pa.float64() if pa.types.is_floating(column_type) or isinstance(value, float) else pa.int64()
    return None


def _coerce_literal(value: Any, typ: pa.DataType, col: Column) -> Any:
    """A literal made comparable with a column of type ``typ`` (FilterError if it cannot be)."""
    if value is None:
        return None
    name = col.name if col.key is None else f"{col.name}['{col.key}']"
    if pa.types.is_boolean(typ):
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
        raise FilterError(f"filter: {name} is true/false; compare it with TRUE or FALSE")
    if _is_number(typ):
        if isinstance(value, bool):
            raise FilterError(f"filter: {name} is a number; compare it with a number")
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise FilterError(
                    f"filter: {name} is a number; {value!r} is not one"
                ) from None
        return value
    if _is_text(typ):
        if isinstance(value, bool):
            raise FilterError(f"filter: {name} is text; quote the value ('...')")
        return value
    return value


def evaluate(expr: Expr | None, table: pa.Table) -> np.ndarray:
    """``(n,) bool`` mask of the rows of ``table`` that satisfy ``expr`` (unknown -> False)."""
    n = table.num_rows
    if expr is None:
        return np.ones(n, dtype=bool)
    result = _Evaluator(table).eval(expr)
    if isinstance(result, pa.ChunkedArray):
        result = result.combine_chunks()
    if not pa.types.is_boolean(result.type):  # pragma: no cover - the grammar yields booleans
        raise FilterError("filter: the expression is not true/false")
    mask = pc.fill_null(result, False).to_numpy(zero_copy_only=False)
    return np.asarray(mask, dtype=bool)


def compile_where(where: str, table: pa.Table) -> np.ndarray:
    """Parse and evaluate ``where`` over ``table``: ``(n,) bool`` (all True when empty)."""
    return evaluate(parse_where(where), table)


def _canonical(node: Expr | Column | Literal) -> str:
    """A text form of a parsed node that differs whenever the meaning may differ.

    Literals carry their Python type (``1``, ``1.0`` and ``true`` compare equal as
    Python values but not as filter literals) and their exact ``repr`` (quoted text
    keeps its whitespace and case); keywords and spacing outside literals vanish.
    """
    if isinstance(node, Literal):
        return f"{type(node.value).__name__}:{node.value!r}"
    if isinstance(node, Column):
        return f"col({node.name!r},{node.key!r})"
    if isinstance(node, Compare):
        return f"cmp({node.op},{_canonical(node.left)},{_canonical(node.right)})"
    if isinstance(node, InList):
        values = ",".join(_canonical(Literal(v)) for v in node.values)
        return f"in({_canonical(node.operand)},[{values}],{node.negated})"
    if isinstance(node, Between):
        return (
            f"between({_canonical(node.operand)},{_canonical(node.low)},"
            f"{_canonical(node.high)},{node.negated})"
        )
    if isinstance(node, Like):
        return f"like({_canonical(node.operand)},{node.pattern!r},{node.ignore_case},{node.negated})"
    if isinstance(node, IsNull):
        return f"isnull({_canonical(node.operand)},{node.negated})"
    if isinstance(node, BoolColumn):
        return f"bool({_canonical(node.operand)})"
    if isinstance(node, Not):
        return f"not({_canonical(node.operand)})"
    return f"{node.op.lower()}({','.join(_canonical(o) for o in node.operands)})"


@functools.lru_cache(maxsize=256)
def _parse_keyed(where: str) -> tuple[Expr | None, str]:
    """``parse_where`` plus the canonical key, memoised on the exact text."""
    expr = parse_where(where)
    return expr, "" if expr is None else _canonical(expr)


def canonical_where(where: str) -> str:
    """The cache key of a filter: a canonical text of its parsed expression ("" = none).

    Two texts get one key only when they parse to the same tree, so a cache keyed on it
    never answers one filter with another's rows (``'a  b'`` and ``'a b'`` stay apart).
    Raises :class:`FilterError` like :func:`parse_where`.
    """
    if not isinstance(where, str):
        raise FilterError(f"filter: where must be text, not {type(where).__name__}")
    return _parse_keyed(where)[1]


class FilterCache:
    """A small LRU of evaluated filters for one metadata table (masks are read-only).

    Keyed on :func:`canonical_where`, so spellings of one expression share an entry and
    different expressions never do.
    """

    def __init__(self, table: pa.Table, *, size: int = 32) -> None:
        self.table = table
        self.size = size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def mask(self, where: str) -> np.ndarray | None:
        """The mask of ``where`` (None when the filter is empty: every row passes)."""
        if not isinstance(where, str):
            raise FilterError(f"filter: where must be text, not {type(where).__name__}")
        expr, key = _parse_keyed(where)
        if expr is None:
            return None
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        mask = evaluate(expr, self.table)
        mask.setflags(write=False)
        with self._lock:
            self._cache[key] = mask
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return mask


__all__ = [
    "MAX_WHERE_LENGTH",
    "FilterCache",
    "canonical_where",
    "compile_where",
    "evaluate",
    "filterable_columns",
    "parse_where",
]
