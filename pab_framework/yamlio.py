"""YAML in and out: `safe_load` only, with the line of every key kept for error messages."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import PabError, Problem, SpecError, format_path

# A YAML file is a few kilobytes; anything this large is a mistake or an attack (alias bombs).
MAX_SPEC_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_NUMBER_CHARS = 400  # longer numbers are mistakes (and Python refuses > 4300 digits)
MAX_DEPTH = 64  # a spec nests a handful of levels; deeper is a mistake or an attack on the parser's recursion


class _LineLoader(yaml.SafeLoader):
    """The safe loader; a separate class so nothing registered on SafeLoader elsewhere leaks in."""


def _count_nodes(node, budget: list) -> None:
    stack = [node]
    while stack:
        n = stack.pop()
        budget[0] += 1
        if budget[0] > MAX_NODES:
            raise yaml.YAMLError("document too large after expanding aliases")
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack.append(k)
                stack.append(v)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


def _lines(node, path: tuple, out: dict) -> None:
    """Record the line of every key path (1-based); a key's line is where the key stands."""
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                out.setdefault(path + (k.value,), k.start_mark.line + 1)
                _lines(v, path + (k.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _lines(v, path + (i,), out)


class LoadedYaml:
    """A parsed YAML mapping plus where each key path stands in the file."""

    def __init__(self, data: Any, lines: dict, source: str):
        self.data = data
        self.lines = lines
        self.source = source

    def line_of(self, path: tuple) -> int | None:
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)


def _problem(source: str, message: str, line: int | None = None, what: str = "spec") -> SpecError:
    return SpecError([Problem((), message, line, source)], title=f"invalid {what}")


def read_text(path: Path, what: str = "spec") -> str:
    source = str(path)
    if not path.exists():  # nothing to be invalid yet: the path is wrong
        raise PabError(f"{what} file not found: {source}")
    if path.is_dir():
        raise PabError(f"{source} is a directory, not a {what} file")
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise _problem(source, f"{what} file is {size} bytes; a {what} file is at most {MAX_SPEC_BYTES} bytes", what=what)
        raw = path.read_bytes()
    except OSError as e:
        raise _problem(source, f"cannot read {what} file: {e.strerror or e}", what=what) from None
    if b"\x00" in raw:
        raise _problem(source, f"not a YAML {what}: the file is binary", what=what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _problem(source, f"not a YAML {what}: not UTF-8 text ({e.reason} at byte {e.start})", what=what) from None


def _check_depth(text: str, source: str, what: str) -> None:
    """Refuse deep nesting before the (recursive) composer sees it; event parsing is iterative."""
    depth = 0
    for ev in yaml.parse(text, Loader=_LineLoader):
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise _problem(source, f"not a usable {what}: nested more than {MAX_DEPTH} levels deep", ev.start_mark.line + 1, what)
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _check_nodes(node, path: tuple, source: str, seen_nodes: set, what: str = "spec") -> None:
    """A key given twice in one mapping is refused (YAML would silently keep the last one), and so
    is a number too long to be a setting."""
    stack = [(node, path)]
    while stack:
        n, p = stack.pop()
        if id(n) in seen_nodes:  # an alias: already checked
            continue
        seen_nodes.add(id(n))
        if isinstance(n, yaml.ScalarNode) and n.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") and len(n.value) > MAX_NUMBER_CHARS:
            raise SpecError([Problem(p, f"a number written with {len(n.value)} characters is too large for any setting", n.start_mark.line + 1, source)], title=f"invalid {what}")
        if isinstance(n, yaml.MappingNode):
            first: dict = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    ident = (k.tag, k.value)
                    if ident in first:
                        raise SpecError([Problem(p + (k.value,), f"duplicate key {k.value!r} in {format_path(p) or 'the top level'} "
                                                 f"(first given at line {first[ident]}); give each key once", k.start_mark.line + 1, source)], title=f"invalid {what}")
                    first[ident] = k.start_mark.line + 1
                stack.append((v, p + (k.value,) if isinstance(k, yaml.ScalarNode) else p))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend((v, p + (i,)) for i, v in enumerate(n.value))


def load_yaml_text(text: str, source: str, what: str = "spec") -> LoadedYaml:
    try:
        _check_depth(text, source, what)
        node = yaml.compose(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        msg = " ".join(x for x in (e.context, e.problem) if x)
        if "python/" in text and "could not determine a constructor" in str(e):
            msg = "tags that construct Python objects are refused (only plain YAML is read)"
        raise _problem(source, f"not valid YAML: {msg}", line, what) from None
    except yaml.YAMLError as e:
        raise _problem(source, f"not valid YAML: {e}", what=what) from None
    if node is None:
        raise _problem(source, f"the {what} file is empty", what=what)
    try:
        _count_nodes(node, [0])
    except yaml.YAMLError as e:
        raise _problem(source, f"not a usable {what}: {e}", what=what) from None
    _check_nodes(node, (), source, set(), what)
    try:
        data = _LineLoader(text).get_single_data()
    except yaml.constructor.ConstructorError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        if e.problem and "python/" in e.problem:
            msg = "a Python tag is refused: specs are plain YAML (safe_load), they never construct objects"
        else:
            msg = f"not valid YAML: {e.problem}"
        raise _problem(source, msg, line, what) from None
    except (yaml.YAMLError, RecursionError) as e:
        raise _problem(source, f"not valid YAML: {e}", what=what) from None
    except ValueError as e:  # a number too long to convert (Python's int digit limit), say
        raise _problem(source, f"not a usable {what}: {str(e).splitlines()[0][:200]}", what=what) from None
    if not isinstance(data, dict):
        kind = type(data).__name__ if data is not None else "nothing"
        raise _problem(source, f"the {what} must be a mapping of keys to values, found {kind}", node.start_mark.line + 1, what)
    lines: dict = {}
    _lines(node, (), lines)
    return LoadedYaml(data, lines, source)


def load_yaml_file(path: str | Path, what: str = "spec") -> LoadedYaml:
    path = Path(path)
    return load_yaml_text(read_text(path, what), str(path), what)


def parse_scalar(text: str) -> Any:
    """A command-line value, read as a YAML scalar or flow list/mapping (`5`, `1e-3`, `[80, 120]`)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if value is None and text.strip() not in ("null", "~", "") else value


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


