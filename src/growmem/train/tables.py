"""Result tables from sweeps: read one or more ``results.csv`` files, select rows, pivot to markdown.

    growmem table --results runs/mqar_sweep/results.csv --rows model.mixer \
        --cols task.options.num_kv_pairs --value accuracy

Cells that collect several runs (e.g. seeds) show ``mean (min-max, n=k)``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path


def read_results(paths: str | Path | list[str | Path]) -> list[dict[str, str]]:
    """The rows of one or more results.csv files (columns may differ between files; missing cells are '')."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows: list[dict[str, str]] = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise ValueError(f"results file {str(p)!r} does not exist")
        with p.open(newline="") as fh:
            rows += list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"no rows in {[str(p) for p in paths]}")
    return rows


def parse_filters(items: list[str] | None) -> dict[str, str]:
    """``["key=value", ...]`` -> ``{key: value}`` (values compared as strings, numbers by value)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"filter {item!r} must look like column=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _same(cell: str | None, want: str) -> bool:
    if cell is None:
        return False
    if cell == want:
        return True
    try:
        return float(cell) == float(want)
    except ValueError:
        return False


def select(rows: list[dict[str, str]], filters: dict[str, str]) -> list[dict[str, str]]:
    """Rows whose every filtered column equals the wanted value; unknown columns raise."""
    for k in filters:
        if not any(k in r for r in rows):
            cols = sorted({c for r in rows for c in r})
            raise ValueError(f"filter column {k!r} is in none of the rows (columns: {cols})")
    return [r for r in rows if all(_same(r.get(k), v) for k, v in filters.items())]


def _key(v: str) -> tuple[int, float, str]:
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, math.nan, v)


def _cell(values: list[float], digits: int) -> str:
    if not values:
        return ""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f}, n={len(values)})"


def _span(values: list[str]) -> str:
    uniq = sorted(set(values), key=_key)
    return uniq[0] if len(uniq) == 1 else (f"{uniq[0]}-{uniq[-1]}" if uniq else "")


def _value(r: dict[str, str], value: str | list[str]) -> str:
    """The first non-empty of ``value``'s columns in row ``r`` ('' if none)."""
    for v in [value] if isinstance(value, str) else value:
        if r.get(v, "") != "":
            return r[v]
    return ""


def pivot_markdown(rows: list[dict[str, str]], row_key: str, col_key: str, value: str | list[str], digits: int = 3,
                   extra: list[str] | None = None) -> str:
    """A markdown table: one line per value of ``row_key`` (in order of first appearance), one column per
    value of ``col_key`` (sorted, numbers by value), cells ``value`` (mean over duplicates, with range;
    a list of columns takes the first one a row has, e.g. ``["accuracy", "sequence_accuracy"]`` for tasks
    with different metrics).
    ``extra`` columns (e.g. ``params``) are shown after the row label: their value on that line, or
    ``min-max`` where it differs between the line's cells (e.g. parameters across widths)."""
    values = [value] if isinstance(value, str) else list(value)
    for k in (row_key, col_key, values):
        if not any(any(c in r for c in k) if isinstance(k, list) else k in r for r in rows):
            raise ValueError(f"column {k!r} not in the results (columns: {sorted({c for r in rows for c in r})})")
    extra = extra or []
    labels = list(dict.fromkeys(r[row_key] for r in rows if r.get(row_key, "") != ""))
    cols = sorted({r[col_key] for r in rows if r.get(col_key, "") != ""}, key=_key)
    cells: dict[tuple[str, str], list[float]] = {}
    extras: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r.get(row_key, "") == "" or r.get(col_key, "") == "" or _value(r, value) == "":
            continue
        cells.setdefault((r[row_key], r[col_key]), []).append(float(_value(r, value)))
        for e in extra:
            if r.get(e, "") != "":
                extras.setdefault((r[row_key], e), []).append(r[e])
    short = col_key.split(".")[-1]
    head = [row_key.split(".")[-1], *extra, *(f"{short}={c}" for c in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * (1 + len(extra)) + "---:|" * len(cols)]
    for lab in labels:
        ex = [_span(extras.get((lab, e), [])) for e in extra]
        lines.append("| " + " | ".join([lab, *ex, *(_cell(cells.get((lab, c), []), digits) for c in cols)]) + " |")
    return "\n".join(lines) + "\n"


def mean_by(rows: list[dict[str, str]], keys: tuple[str, ...], value: str | list[str]) -> dict[tuple[str, ...], float]:
    """Mean of ``value`` (or the first of several columns a row has) over rows sharing ``keys`` (used by
    plots to average seeds), in order of first appearance."""
    acc: dict[tuple[str, ...], list[float]] = {}
    for r in rows:
        if any(r.get(k, "") == "" for k in keys) or _value(r, value) == "":
            continue
        acc.setdefault(tuple(r[k] for k in keys), []).append(float(_value(r, value)))
    return {k: sum(v) / len(v) for k, v in acc.items()}
