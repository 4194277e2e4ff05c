"""Expands a panel's SQL the way Grafana and grafana-clickhouse-datasource do before ClickHouse sees it.

Order and rules follow the plugin: the frontend first resolves `$__conditionalAll(cond, $var)` (cond becomes
1=1 when the variable is All or empty), then Grafana's template service replaces variables (the plugin's own
formatter joins a multi-value as 'a','b'; `:singlequote` quotes each value and escapes quotes as \\'); then the
backend (pkg/macros/macros.go) expands the time macros.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ALL = "$__all"
_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)|\[\[(\w+)(?::(\w+))?\]\]")
_MACRO = re.compile(r"\$__(\w+)\b(?:\(([^()]*)\))?")


@dataclass(frozen=True)
class Variable:
    selected: Sequence[str]
    options: Sequence[str]

    def values(self) -> list[str]:
        return list(self.options) if list(self.selected) == [ALL] else list(self.selected)


def _macro_args(text: str, open_index: int) -> tuple[list[str], int]:
    """The comma-separated arguments of the call whose "(" is at open_index, and the index after its ")"."""
    depth, start, args = 0, open_index + 1, []
    for index in range(open_index, len(text)):
        char = text[index]
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                args.append(text[start:index])
                return args, index + 1
        elif char == "," and depth == 1:
            args.append(text[start:index])
            start = index + 1
    raise ValueError("unbalanced $__conditionalAll")


def apply_conditional_all(sql: str, variables: Mapping[str, Variable]) -> str:
    macro = "$__conditionalAll("
    while (index := sql.rfind(macro)) != -1:
        args, end = _macro_args(sql, index + len(macro) - 1)
        assert len(args) == 2, sql[index:end]
        name = re.search(r"(?<=\$\{)\w+(?=\})|(?<=\$)\w+", args[1].strip())
        phrase = args[0]
        if name and name.group(0) in variables:
            current = ",".join(variables[name.group(0)].selected)
            if current in ("", ALL):
                phrase = "1=1"
        sql = sql[:index] + phrase + sql[end:]
    return sql


def _format(values: list[str], fmt: str | None) -> str:
    if fmt == "singlequote":
        return ",".join("'" + value.replace("'", "\\'") + "'" for value in values)
    if fmt in ("raw", "csv"):
        return ",".join(values)
    if fmt is not None:
        raise ValueError(f"format {fmt} is not modelled here")
    # The plugin's own formatter; Grafana hands it an array for a multi-value variable, even with one value
    return "'" + "','".join(values) + "'"


def replace_variables(sql: str, variables: Mapping[str, Variable]) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3) or match.group(4)
        fmt = match.group(2) or match.group(5)
        if name not in variables:
            return match.group(0)
        return _format(variables[name].values(), fmt)

    return _VARIABLE.sub(substitute, sql)


def expand_macros(sql: str, start_s: int, end_s: int, interval_s: int) -> str:
    def to_datetime64(seconds: int) -> str:
        return f"fromUnixTimestamp64Milli({seconds * 1000})"

    def expand(match: re.Match[str]) -> str:
        name, raw_args = match.group(1), match.group(2)
        args = [arg.strip() for arg in raw_args.split(",")] if raw_args is not None else []
        column = args[0] if args else ""
        expansions = {
            "fromTime": f"toDateTime({start_s})",
            "toTime": f"toDateTime({end_s})",
            "fromTime_ms": to_datetime64(start_s),
            "toTime_ms": to_datetime64(end_s),
            "timeFilter": f"{column} >= toDateTime({start_s}) AND {column} <= toDateTime({end_s})",
            "timeFilter_ms": f"{column} >= {to_datetime64(start_s)} AND {column} <= {to_datetime64(end_s)}",
            "timeInterval": f"toStartOfInterval(toDateTime({column}), INTERVAL {max(interval_s, 1)} second)",
            "interval_s": str(max(interval_s, 1)),
        }
        if name not in expansions:
            raise ValueError(f"macro $__{name} is not one the plugin expands")
        return expansions[name]

    return _MACRO.sub(expand, sql)


def expand(sql: str, variables: Mapping[str, Variable], start_s: int, end_s: int, interval_s: int) -> str:
    return expand_macros(replace_variables(apply_conditional_all(sql, variables), variables), start_s, end_s,
                         interval_s)
