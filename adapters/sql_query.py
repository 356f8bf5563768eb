"""The SQL of ``type = sql``: the admin's queries, their named parameters, and the wrappers that
make the database compute exact sizes.

Queries are written with ``:name`` parameters in every driver's configuration and translated here
to the driver's own style (sqlite keeps ``:name``; psycopg2 and the MySQL drivers get
``%(name)s``, with a literal ``%`` doubled). The translation is a scanner, not a search and
replace: string literals, quoted identifiers, comments and PostgreSQL's ``::`` casts are left as
they are, so nothing inside them ever becomes a parameter. Values always travel as parameters;
pop3sf never builds SQL from data.

Sizes (docs/adapters.md#sessions) are computed by the database, without sending bodies: the
admin's listing query becomes a subquery, and the outer query returns, per row, one number: the
body's octet length, plus one for every *bare* CR or LF (each becomes CRLF on the wire), plus 2
when the last octet is not a line end. Per dialect:

* sqlite: ``replace()`` passes over the body as a BLOB (SQLite has no regular expressions): one
  pass (counting LFs) for a body without CR, the usual case, three otherwise. The database is
  this process, so "not sending" means not copying bodies into Python objects.
* postgresql: three ``replace()`` passes over the text (a ``bytea`` body through
  ``encode(..., 'escape')``, which keeps CR and LF as they are); ``OFFSET 0`` keeps the planner
  from computing the view of the body once per use.
* mysql: MariaDB counts in one linear ``REGEXP_REPLACE``, MySQL with ``REPLACE`` (see
  :mod:`.mysql_sql`, whose expressions these are). Where MariaDB can't (a result over
  ``max_allowed_packet``: NULL), the session measures that one body by reading it.

Date/time columns come back as Unix seconds computed by the database (PostgreSQL ``EXTRACT``,
MySQL ``TIMESTAMPDIFF``), which drivers hand over far cheaper than datetime objects.

The cost: every login makes the database read every listed body once (it must look at the
octets to count line ends); the network carries about 60 octets per row; pop3sf renders no
header at LIST time (its length is arithmetic, :data:`.sql_session.HEADER_BASE`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .base import ConfigError
from .mysql_sql import BARE_LINE_ENDS_RE, _has_8bit

#: The parameters each query may use.
ALLOWED_PARAMS: Mapping[str, frozenset[str]] = {
    "list_query": frozenset({"user"}),
    "body_query": frozenset({"id", "user"}),
    "delete_query": frozenset({"id", "user"}),
    "password_query": frozenset({"user"}),
}
#: Octets of a raw message searched for its header section (8-bit headers only).
HEADER_PREFIX = 64 * 1024

_STANDARD = re.compile(r"""
    (?P<skip>'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|/\*.*?\*/|::)
  | :(?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<positional>\?|[@$][A-Za-z_0-9])
  | (?P<percent>%)
  | (?P<open>['"]|/\*)
""", re.S | re.X)
#: MySQL: backslash escapes in strings, back-quoted identifiers, ``#`` comments.
_MYSQL = re.compile(r"""
    (?P<skip>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|`[^`]*`|(?:--\s|\#)[^\n]*|/\*.*?\*/)
  | :(?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<positional>(?!))
  | (?P<percent>%)
  | (?P<open>['"`]|/\*)
""", re.S | re.X)


@dataclass(frozen=True)
class Query:
    """One configured query: its text in the driver's style and the parameters it uses."""

    key: str
    text: str
    params: frozenset[str]

    def args(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The parameter mapping for one execution (only the names this query uses)."""
        return {name: values.get(name) for name in self.params}


def translate(sql: str, key: str, dialect: str) -> Query:
    """``sql`` with ``:name`` parameters in ``dialect``'s style, or :class:`ConfigError`."""
    if not sql.strip():
        raise ConfigError(f"{key} is empty")
    allowed = ALLOWED_PARAMS[key]
    pyformat = dialect != "sqlite"
    pattern = _MYSQL if dialect == "mysql" else _STANDARD
    out: list[str] = []
    names: set[str] = set()
    pos = 0
    for m in pattern.finditer(sql):
        out.append(_plain(sql[pos:m.start()], pyformat))
        pos = m.end()
        if m.group("skip") is not None:
            out.append(_plain(m.group(0), pyformat))
        elif m.group("name") is not None:
            name = m.group("name")
            if name not in allowed:
                raise ConfigError(f"{key}: unknown parameter :{name} (allowed here: "
                                  f"{', '.join(':' + n for n in sorted(allowed))})")
            names.add(name)
            out.append(f"%({name})s" if pyformat else f":{name}")
        elif m.group("positional") is not None:
            if pyformat:  # only sqlite reads ? @x $x as parameters
                out.append(m.group(0))
                continue
            raise ConfigError(f"{key}: positional parameter {m.group(0)!r}: use named "
                              f"parameters only ({', '.join(':' + n for n in sorted(allowed))})")
        elif m.group("percent") is not None:
            out.append("%%" if pyformat else "%")
        else:
            raise ConfigError(f"{key}: unterminated quote or comment at offset {m.start()}")
    out.append(_plain(sql[pos:], pyformat))
    text = "".join(out).strip().rstrip(";").strip()
    if ";" in _strip_literals(text, pattern):
        raise ConfigError(f"{key}: one statement only (found ';')")
    # A line break ends a trailing "--" comment before the wrappers' closing parenthesis.
    return Query(key, text + "\n", frozenset(names))


def _plain(text: str, pyformat: bool) -> str:
    return text.replace("%", "%%") if pyformat else text


def _strip_literals(text: str, pattern: re.Pattern[str]) -> str:
    return pattern.sub(lambda m: "" if m.group("skip") else m.group(0), text)


# --- columns ------------------------------------------------------------------------------

RENDERED = ("id", "date", "subject", "body")
OPTIONAL = ("sender",)
RAW = ("id", "message")


@dataclass(frozen=True)
class Shape:
    """What the listing query returns: ``raw`` (a ``message`` column) or rendered columns;
    ``binary`` whether the body column is binary (PostgreSQL: ``bytea``)."""

    raw: bool
    sender: bool
    date: bool
    binary: bool = False
    #: The date column has a date/time type the database turns into Unix seconds itself.
    date_type: bool = False

    @property
    def body(self) -> str:
        return "message" if self.raw else "body"


def shape_of(key: str, columns: Sequence[str], binary: bool = False,
             date_type: bool = False) -> Shape:
    """Check the listing query's column names; :class:`ConfigError` names what is wrong."""
    names = [c.lower() for c in columns]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"{key}: column {sorted(dupes)[0]!r} returned twice")
    have = set(names)
    if "message" in have:
        extra = have - {"id", "message", "date"}
        if "id" not in have or extra:
            raise ConfigError(f"{key} returns {', '.join(names)}: a complete message needs "
                              "exactly id, message (and optionally date, for the order)")
        return Shape(True, False, "date" in have, binary, date_type)
    missing = [c for c in RENDERED if c not in have]
    unknown = sorted(have - set(RENDERED) - set(OPTIONAL))
    if missing or unknown:
        problem = (f"missing {', '.join(missing)}" if missing
                   else f"unknown column {unknown[0]!r}")
        raise ConfigError(f"{key} returns {', '.join(names) or 'no columns'} ({problem}): "
                          "name the columns id, date, subject, body and optionally sender "
                          "(AS ...), or id, message for complete RFC 5322 messages")
    return Shape(False, "sender" in have, True, binary, date_type)


def check_single(key: str, columns: Sequence[str], wanted: Sequence[str]) -> None:
    """A query that must return exactly the columns ``wanted`` (in any order)."""
    names = sorted(c.lower() for c in columns)
    if names != sorted(wanted):
        raise ConfigError(f"{key} returns {', '.join(names) or 'no columns'}: it must return "
                          f"exactly {', '.join(wanted)} (name them with AS)")


def describe_sql(query: Query) -> str:
    """The query run for its column names only: no rows are produced."""
    return f"SELECT * FROM ({query.text}) AS pop3sf_q WHERE 1 = 0"


# --- the wrappers -------------------------------------------------------------------------

def _date(dialect: str, shape: Shape) -> str:
    """The date column, or Unix seconds computed by the database for a date/time type (far
    cheaper for a driver to hand over than a datetime object; naive values count as UTC, as
    :func:`.sql_session.to_datetime` takes them)."""
    if not shape.date:
        return "NULL"
    if shape.date_type and dialect == "postgresql":
        return "EXTRACT(EPOCH FROM date)::float8"
    if shape.date_type and dialect == "mysql":
        return "TIMESTAMPDIFF(SECOND, '1970-01-01 00:00:00', date)"
    return "date"


def listing_sql(dialect: str, query: Query, shape: Shape, mariadb: bool = True) -> str:
    """The listing wrapped so the database returns, per row: id, date, then for rendered rows
    subject, sender and the body's wire size; for complete messages the wire size, the octet
    length and (8-bit header candidates only) the header prefix. The size is NULL where the
    database could not count (MariaDB's REGEXP_REPLACE over max_allowed_packet)."""
    body = f"pop3sf_q.{shape.body}"
    date = _date(dialect, shape)
    if dialect == "sqlite":
        n = "length(pop3sf_b)"
        def gone(s: str) -> str:
            return f"({n} - length(CAST(replace(pop3sf_b, {s}, '') AS BLOB)))"
        # Most rows a script writes have no CR at all: one replace() pass counts their LFs.
        bare = (f"CASE WHEN instr(pop3sf_b, char(13)) = 0 THEN {gone('char(10)')} ELSE "
                f"{gone('char(10)')} + {gone('char(13)')} - 2 * ({gone('char(13, 10)')} / 2) END")
        last = "substr(pop3sf_b, -1) NOT IN (X'0A', X'0D')"
        head = f"pop3sf_head8(substr(pop3sf_b, 1, {HEADER_PREFIX}))"
        source = (f"(SELECT pop3sf_q.*, CAST(COALESCE({body}, X'') AS BLOB) AS pop3sf_b "
                  f"FROM ({query.text}) AS pop3sf_q) AS pop3sf_w")
    elif dialect == "postgresql":
        if shape.binary:
            b = f"COALESCE({body}, ''::bytea)"
            t = "encode(pop3sf_b, 'escape')"
            prefix = f"substring(pop3sf_b from 1 for {HEADER_PREFIX})"
            head = f"CASE WHEN encode({prefix}, 'hex') ~ '^(..)*[89a-f]' THEN {prefix} END"
        else:
            b = f"COALESCE(({body})::text, '')"
            t = "pop3sf_b"
            prefix = f"left(pop3sf_b, {HEADER_PREFIX})"
            head = (f"CASE WHEN octet_length({prefix}) <> char_length({prefix}) "
                    f"THEN convert_to({prefix}, 'UTF8') END")
        def gone(s: str) -> str:
            return f"(length(pop3sf_t) - length(replace(pop3sf_t, {s}, '')))"
        n = "octet_length(pop3sf_b)"
        bare = f"{gone('chr(10)')} + {gone('chr(13)')} - 2 * ({gone('chr(13) || chr(10)')} / 2)"
        last = "right(pop3sf_t, 1) NOT IN (chr(10), chr(13))"
        source = (f"(SELECT pop3sf_q.*, {t} AS pop3sf_t FROM "
                  f"(SELECT pop3sf_q.*, {b} AS pop3sf_b FROM ({query.text}) AS pop3sf_q "
                  f"OFFSET 0) AS pop3sf_q OFFSET 0) AS pop3sf_w")
    else:  # mysql / mariadb
        n = "LENGTH(pop3sf_b)"
        if mariadb:
            bare = "LENGTH(REGEXP_REPLACE(pop3sf_b, %(pop3sf_bare)s, ''))"
        else:
            def gone(s: str) -> str:
                return f"(LENGTH(pop3sf_b) - LENGTH(REPLACE(pop3sf_b, {s}, '')))"
            bare = (f"({gone('CHAR(10)')} + {gone('CHAR(13)')} - 2 * "
                    f"({gone('CHAR(13,10)')} DIV 2))")
        last = "RIGHT(pop3sf_b, 1) NOT IN (CHAR(10), CHAR(13))"
        prefix = f"LEFT(pop3sf_b, {HEADER_PREFIX})"
        head = f"IF({_has_8bit(prefix)}, {prefix}, NULL)"
        source = (f"(SELECT pop3sf_q.*, CAST(COALESCE({body}, '') AS BINARY) AS pop3sf_b "
                  f"FROM ({query.text}) AS pop3sf_q) AS pop3sf_w")
    # octets + one per bare CR or LF + a CRLF after a last line without one
    size = f"{n} + {bare} + CASE WHEN {n} > 0 AND {last} THEN 2 ELSE 0 END"
    if shape.raw:
        return f"SELECT id, {date}, {size}, {n}, {head} FROM {source}"
    sender = "sender" if shape.sender else "NULL"
    return f"SELECT id, {date}, subject, {sender}, {size} FROM {source}"


def listing_args(dialect: str, query: Query, values: Mapping[str, Any]) -> dict[str, Any]:
    args = query.args(values)
    if dialect == "mysql":
        args["pop3sf_bare"] = BARE_LINE_ENDS_RE
    return args


def body_sql(dialect: str, query: Query, shape: Shape) -> str:
    """The body query wrapped to return the body as the very octets the listing measured."""
    col = f"pop3sf_q.{shape.body}"
    if dialect == "sqlite":
        expr = f"CAST(COALESCE({col}, X'') AS BLOB)"
    elif dialect == "postgresql":
        expr = f"COALESCE({col}, ''::bytea)" if shape.binary else f"COALESCE(({col})::text, '')"
    else:
        expr = f"CAST(COALESCE({col}, '') AS BINARY)"
    return f"SELECT {expr} FROM ({query.text}) AS pop3sf_q"
