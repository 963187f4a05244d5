"""The exercise machinery: stubs from minitrain's own source, the graded run, the report, hints.

What: `create_stub` reads a minitrain module with `ast` and writes the learner's file: the module's
teaching docstring, its imports (never of the module itself), the constants the signatures need,
and for every name of the exercise the original `def`/`class` lines and docstrings with bodies
`raise NotImplementedError("exercise clip: write grad_norm")`. Private helpers are not copied.
`check` runs the exercise's property tests in a fresh pytest process with
MINITRAIN_EXERCISE=<name> (tests/implementation.py then hands the tests the learner's names),
collects every test's outcome with a small pytest plugin and prints one line per property: its
docstring, PASS / FAIL / NOT STARTED, and for a failure Hypothesis's minimal counterexample next to
what the built-in returned.

Why generate instead of keeping copies: the stub can never drift from the code it stands for.

Common bug: a stub that still imports the solution (`from minitrain.clip import grad_norm`): the
check would grade minitrain. Imports of the exercise's own module are dropped, and
tests/test_exercises.py proves the untouched stub fails every property.
"""
import ast
import builtins
import hashlib
import json
import os
import pathlib
import re
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]
KEEP_DECORATOR = re.compile(r"@(staticmethod|classmethod|property|[\w.]*setter|[\w.]*contextmanager)\b")
NOT_STARTED = re.compile(r"exercise (\w+): write ([\w.]+)")


def workspace_dir(path=None):
    return pathlib.Path(path or os.environ.get("MINITRAIN_WORKSPACE") or REPO / "exercises").resolve()


def module_file(ex):
    return REPO / (ex.module.replace(".", "/") + ".py")


def _rel(path):
    path = pathlib.Path(path)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def lesson_title(number):
    markers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    titles = dict(m.split(": ", 1) for m in markers)
    return f"{number:02d} {titles.get(f'lesson{number:02d}', '')}".strip()


def available(ex):
    """(True, '') when the module has the exercise's names and its test files use under_test."""
    if not module_file(ex).exists():
        return False, f"{_rel(module_file(ex))} does not exist yet"
    defined = {n.name for n in ast.parse(module_file(ex).read_text()).body if hasattr(n, "name")}
    missing = [n for n in ex.names if n not in defined]
    if missing:
        return False, f"{ex.module} has no {', '.join(missing)}"
    for test_file in dict.fromkeys(t.split("::")[0] for t in ex.tests):
        if not (REPO / test_file).exists():
            return False, f"{test_file} does not exist yet"
        adopted = rf"under_test\(\s*[\"']{re.escape(ex.module)}[\"']"
        if not re.search(adopted, (REPO / test_file).read_text()):
            return False, f"{test_file} does not take {ex.module} from tests/implementation.py yet"
    return True, ""


# ---- stubs ---------------------------------------------------------------------------------
def _doc_node(node):
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
            and isinstance(first.value.value, str):
        return first
    return None


def _header(node, lines):
    """Kept decorator lines + the original def/class lines through the docstring."""
    out = []
    for d in node.decorator_list:
        text = lines[d.lineno - 1].strip()
        if KEEP_DECORATOR.match(text):
            out.extend(lines[d.lineno - 1:d.end_lineno])
    doc = _doc_node(node)
    end = doc.end_lineno if doc else node.body[0].lineno - 1
    if node.body[0].lineno == node.lineno:              # one-line def: rebuild its header
        indent = " " * node.col_offset
        shell = type(node)(**{**{f: getattr(node, f) for f in node._fields}, "body": [ast.Pass()],
                              "decorator_list": []})
        return out + [indent + ast.unparse(shell).splitlines()[0]]
    return out + lines[node.lineno - 1:end]


def _public_attributes(node, lines):
    """`# self.x: <its comment>` for each public attribute __init__ sets (the tests may read them)."""
    out = []
    for st in ast.walk(node):
        targets = st.targets if isinstance(st, ast.Assign) else [getattr(st, "target", None)]
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self" \
                    and not t.attr.startswith("_") and t.attr not in {o.split(":")[0][8:] for o in out}:
                comment = lines[st.lineno - 1].partition("#")[2].strip()
                out.append(f"# self.{t.attr}: {comment}".rstrip(": "))
    return ["public attributes to set:"] + out if out else []


def _stub_function(node, lines, exercise, qualname):
    indent = " " * (node.col_offset + 4)
    notes = _public_attributes(node, lines) if node.name == "__init__" else []
    notes = [f"{indent}# {notes[0]}"] + [indent + n for n in notes[1:]] if notes else []
    return _header(node, lines) + notes + [
        f'{indent}raise NotImplementedError("exercise {exercise}: write {qualname}")']


def _stub_class(node, lines, exercise, also):
    out = _header(node, lines)
    n_header = len(out)
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            qual = f"{node.name}.{item.name}"
            dunder = item.name.startswith("__") and item.name.endswith("__")
            if not item.name.startswith("_") or dunder or qual in also:
                out += [""] + _stub_function(item, lines, exercise, qual)
        elif isinstance(item, (ast.Assign, ast.AnnAssign)) and item is not _doc_node(node):
            targets = item.targets if isinstance(item, ast.Assign) else [item.target]
            if all(isinstance(t, ast.Name) and not t.id.startswith("_") for t in targets):
                out += lines[item.lineno - 1:item.end_lineno]
    if len(out) == n_header and _doc_node(node) is None:
        out.append(" " * (node.col_offset + 4) + "pass")
    return out


def _names_in(nodes):
    return {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name)}


def stub_text(ex):
    """The learner's starting file for exercise `ex`, generated from minitrain's module."""
    path = module_file(ex)
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    wanted = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
              and n.name in ex.names]
    also = set(ex.also)
    names = ", ".join(ex.names)
    out = [f"# Exercise {ex.name} (lesson {lesson_title(ex.lesson)}): write {names}.",
           f"# Generated from {_rel(path)}: its names, signatures and docstrings, no solution.",
           f"# Grade it: make check NAME={ex.name}   stuck: make hint NAME={ex.name}"]
    doc = _doc_node(tree)
    if doc:
        out += lines[doc.lineno - 1:doc.end_lineno]
    available_names = set(dir(builtins))
    imports = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == ex.module:
            continue                                    # never the solution itself
        if isinstance(node, ast.Import) and any(a.name == ex.module for a in node.names):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports += lines[node.lineno - 1:node.end_lineno]
            available_names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    out += [""] + imports if imports else []
    needed = set()
    for node in wanted:                                 # names the kept headers refer to
        parts = list(getattr(node, "decorator_list", [])) + list(getattr(node, "bases", []))
        for fn in [node] + [b for b in getattr(node, "body", []) if isinstance(b, ast.FunctionDef)]:
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                parts += [d for d in fn.args.defaults + fn.args.kw_defaults if d is not None]
        needed |= _names_in(parts)
    constants = []
    for node in tree.body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node is doc:
            continue
        targets = {t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                   for t in ast.walk(t) if isinstance(t, ast.Name)}
        public = all(not t.startswith("_") for t in targets)
        uses_only_known = _names_in([node.value]) <= available_names if node.value else True
        if (targets & needed or public) and uses_only_known:
            constants += lines[node.lineno - 1:node.end_lineno]
            available_names |= targets
    out += [""] + constants if constants else []
    for node in wanted:
        out += ["", ""]
        if isinstance(node, ast.ClassDef):
            out += _stub_class(node, lines, ex.name, also)
        else:
            out += _stub_function(node, lines, ex.name, node.name)
    text = "\n".join(out) + "\n"
    ast.parse(text)                                     # a broken stub fails here, not in a learner's hands
    return text


def create_stub(ex, ws):
    path = ws / f"{ex.name}.py"
    if path.exists():
        return f"{_rel(path)} already exists: not overwritten (delete it to start again)"
    ws.mkdir(parents=True, exist_ok=True)
    path.write_text(stub_text(ex))
    return (f"wrote {_rel(path)}: write {', '.join(ex.names)} (read lesson {lesson_title(ex.lesson)}"
            f" first); then make check NAME={ex.name}")


def _digest(text):
    return hashlib.sha256(text.encode()).hexdigest()


# ---- hints and solution --------------------------------------------------------------------
def bug_notes(ex):
    """(the module's common-bug notes as a list, the docstring's other sentences and bullets)."""
    doc = ast.get_docstring(ast.parse(module_file(ex).read_text())) or ""
    units = re.split(r"\n\s*\n|\n\s*- |\s+(?=\d\. )|(?<=[.:])\s+(?=[A-Z(])", doc)
    sentences = [" ".join(u.split()) for u in units if u.strip()]
    raw = next((p for p in re.split(r"\n\s*\n", doc) if re.match(r"\s*(Common|Classic) bugs?\b", p)), "")
    rest = raw.partition(":")[2]
    if re.search(r"^\s*- ", rest, re.M):
        items = re.split(r"\n\s*- ", "\n" + rest.strip())
    elif "(1)" in rest:
        items = re.split(r"\(\d\)\s*", rest)[1:]
    else:
        items = re.split(r";\s+", re.split(r"\.\s+(?=[A-Z])", rest.strip())[0])
    items = [" ".join(i.split()).rstrip(";.") + "." for i in items if i.strip()]
    return items, sentences


def hints(ex):
    """2-3 graded hints: the common-bug notes the registry picks (most general first)."""
    items, sentences = bug_notes(ex)
    if not ex.hints:
        return items[:3]
    out = []
    for phrase in ex.hints:
        found = next((i for i in items if phrase in i), None) or next(
            (s for s in sentences if phrase in s), None)
        if found is None:
            raise ValueError(f"hint phrase {phrase!r} of exercise {ex.name} is not in "
                             f"{ex.module}'s docstring: update the registry in tests/exercises.py")
        out.append(found)
    return out


def next_hint(ex, ws):
    state_path = ws / ".hints.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    all_hints = hints(ex)
    if not all_hints:
        return f"exercise {ex.name}: no hints ({ex.module} has no common-bug notes yet)"
    k = min(state.get(ex.name, 0) + 1, len(all_hints))
    state[ex.name] = k
    ws.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(state, indent=1))
    text = (f"hint {k} of {len(all_hints)} for {ex.name} (a common bug, from "
            f"{_rel(module_file(ex))}):\n  {all_hints[k - 1]}")
    if k == len(all_hints):
        text += f"\nThat was the last hint; make solution NAME={ex.name} says where minitrain's solution is."
    return text


def solution_location(ex):
    tree = ast.parse(module_file(ex).read_text())
    lines = [f"minitrain's solution of exercise {ex.name} ({ex.module}):"]
    for node in tree.body:
        if getattr(node, "name", None) in ex.names:
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            lines.append(f"  {_rel(module_file(ex))}:{first}  {node.name}")
    lines.append("  graded by: " + " ".join(ex.tests))
    return "\n".join(lines)
