#!/usr/bin/env python3
"""No import cycle between the modules of a crate.

House rule: no module names a module that names it back, directly or through others.
For every crate (default: each workspace member of the top-level Cargo.toml) this builds
the module graph and reports its strongly connected components of more than one module,
with, for each edge inside one, the file:line of a reference that makes it.

Modules: from src/lib.rs (and, as separate crates, src/main.rs and src/bin/*.rs, whose
`crate::` is their own root; the library they use is another crate) along `mod x;`,
`pub mod x;`, inline `mod x { ... }` and `#[path = "..."]`; files `x.rs` or `x/mod.rs`.
The root module is called `crate`.

Edges: module A depends on module B when A's code names a path into B, resolved to the
deepest module the path goes through (`crate::queue::executor::run` -> `queue::executor`,
`crate::queue::QueueState` -> `queue`, `crate::PartName` -> `crate`):
  - `use` declarations, grouped or not, `pub use` re-exports included, with `crate::`,
    `$crate::`, `self::`, `super::` (relative), a child module's name, or a name a `use`
    bound to a module (`use crate::store; ... store::handoff::X` -> `store::handoff`);
  - the same paths inline anywhere in the code (`crate::b::f()`, `super::X`, `child::f()`).
Declaring `mod child` is not an edge; a parent naming `child::X` is one (parent -> child),
a child naming `super::X` is one (child -> parent): a parent and a child that name each
other are a cycle like any other.
Comments (doc comments included), string, byte-string, raw-string and char literals are
blanked before anything is read.

Test code is left out of the graph: `#[cfg(test)]` modules (inline or `mod tests;` files)
and any other `#[cfg(test)]` item (fn, use, impl, ...) are skipped, since tests may reach
anywhere and are not compiled into the crate.

Ratchet: `--baseline FILE` (default scripts/module-cycles.baseline) lists the known cycle
edges, one `<crate> <module> -> <module>` a line. The check fails on a cycle edge the
baseline does not list (a new or grown cycle) and on a listed edge that is no longer in a
cycle (delete those lines in the commit that breaks the cycle; the exact lines are printed).
`--write-baseline` writes the current cycle edges; `--no-baseline` fails on any cycle.
Cycles made only of known edges are summarized in one line (`-v` prints all their edges).

`--rank N` prints the N cycle edges whose removal takes the most edges out of cycles.
`--self-test` checks the fixtures in scripts/fixtures/module-cycles/.

Exit status: 0 clean, 1 a cycle (or ratchet) failure, 2 usage or input error.
"""

from __future__ import annotations

import argparse
import bisect
import glob
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASELINE = os.path.join("scripts", "module-cycles.baseline")
FIXTURES = os.path.join("scripts", "fixtures", "module-cycles")


def warn(msg: str) -> None:
    print(f"check-module-cycles: warning: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# Lexing: blank comments and literals, then split into tokens.

RAW_STR = re.compile(r'(?:br|cr|r)(#*)"')
PREFIXED_STR = re.compile(r'[bc]"')
CHAR_LIT = re.compile(r"b?'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F_]{1,8}\}|.)|[^\\'\n\r])'")
TOKEN = re.compile(r"r#[A-Za-z_]\w*|\$?[A-Za-z_]\w*|::|\S")


def strip_code(src: str) -> str:
    """`src` with comments and string/char literals replaced by spaces (newlines kept)."""
    out = list(src)
    n = len(src)

    def blank(a: int, b: int) -> None:
        for k in range(a, min(b, n)):
            if out[k] != "\n":
                out[k] = " "

    def ident_before(i: int) -> bool:
        return i > 0 and (src[i - 1].isalnum() or src[i - 1] == "_")

    i = 0
    while i < n:
        c = src[i]
        if c == "/" and src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif c == "/" and src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
        elif c in "rbc" and not ident_before(i) and (m := RAW_STR.match(src, i)):
            end = src.find('"' + m.group(1), m.end())
            end = n if end < 0 else end + 1 + len(m.group(1))
            blank(i, end)
            i = end
        elif c == '"' or (c in "bc" and not ident_before(i) and PREFIXED_STR.match(src, i)):
            j = src.index('"', i) + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            blank(i, j + 1)
            i = j + 1
        elif (c == "'" or (c == "b" and not ident_before(i))) and (m := CHAR_LIT.match(src, i)):
            blank(i, m.end())
            i = m.end()
        else:
            i += 1
    return "".join(out)


@dataclass
class Tok:
    v: str
    pos: int


def tokenize(code: str) -> list[Tok]:
    toks = []
    for m in TOKEN.finditer(code):
        v = m.group()
        if v.startswith("r#"):
            v = v[2:]
        toks.append(Tok(v, m.start()))
    return toks


def is_ident(v: str) -> bool:
    return bool(v) and (v[0].isalpha() or v[0] == "_" or v == "$crate")


# ---------------------------------------------------------------------------------------
# The module tree and the raw references of each module.


@dataclass
class Ref:
    segs: tuple[str, ...]
    file: str
    line: int
    glob: bool = False
    alias: str | None = None  # for `use`: the name it binds (None: not a use leaf)
    is_use: bool = False


@dataclass
class Module:
    path: tuple[str, ...]
    file: str
    children: dict[str, "Module"] = field(default_factory=dict)
    refs: list[Ref] = field(default_factory=list)

    @property
    def name(self) -> str:
        return mod_name(self.path)


def mod_name(path: tuple[str, ...]) -> str:
    return "::".join(path) if path else "crate"


class SourceFile:
    def __init__(self, path: str):
        self.path = path
        with open(path, encoding="utf-8") as f:
            self.src = f.read()
        self.code = strip_code(self.src)
        self.toks = tokenize(self.code)
        self.nl = [i for i, ch in enumerate(self.src) if ch == "\n"]
        self.close = self._match_brackets()

    def _match_brackets(self) -> dict[int, int]:
        pairs, stack = {}, []
        for idx, t in enumerate(self.toks):
            if t.v in "([{" and len(t.v) == 1:
                stack.append(idx)
            elif t.v in ")]}" and len(t.v) == 1 and stack:
                pairs[stack.pop()] = idx
        return pairs

    def line(self, tok_idx: int) -> int:
        return bisect.bisect_right(self.nl, self.toks[tok_idx].pos - 1) + 1

    def text(self, a: int, b: int) -> str:
        """Stripped code between tokens a..b (inclusive)."""
        return self.code[self.toks[a].pos : self.toks[b].pos + len(self.toks[b].v)]

    def raw(self, a: int, b: int) -> str:
        return self.src[self.toks[a].pos : self.toks[b].pos + len(self.toks[b].v)]


CFG_TEST = re.compile(r"^cfg\((test|all\((.*,)?test(,.*)?\))\)$")
PATH_ATTR = re.compile(r'^\s*path\s*=\s*"([^"]*)"\s*$')
QUALIFIERS = {"pub", "async", "unsafe", "extern", "default", "safe"}
BRACE_ITEMS = {"fn", "mod", "impl", "trait", "struct", "enum", "union", "macro_rules"}
SEMI_ITEMS = {"use", "const", "static", "type", "let"}


class Crate:
    """One crate target: its module tree, rooted at `root_file`."""

    def __init__(self, label: str, root_file: str):
        self.label = label
        self.modules: dict[tuple[str, ...], Module] = {}
        self.root = self._load(root_file, (), os.path.dirname(root_file))

    def _load(self, file: str, path: tuple[str, ...], child_dir: str) -> Module:
        mod = Module(path, rel(file))
        self.modules[path] = mod
        sf = SourceFile(file)
        self._scan(sf, 0, len(sf.toks), mod, child_dir, inline=False)
        return mod

    def _item_end(self, sf: SourceFile, k: int, end: int) -> int:
        """Index after the item (or field, arm, statement) starting at token k."""
        toks = sf.toks
        j = k
        while j < end and (toks[j].v in QUALIFIERS or (toks[j].v == "const" and j + 1 < end
                                                         and toks[j + 1].v in ("fn", "unsafe", "async", "extern"))):
            j += 2 if toks[j].v == "pub" and j + 1 < end and toks[j + 1].v == "(" else 1
            if toks[j - 1].v == "(":
                j = sf.close.get(j - 1, j - 1) + 1
        kind = toks[j].v if j < end else ""
        if kind == "macro_rules" or (j + 1 < end and toks[j + 1].v == "!"):
            kind = "macro_rules"
        i = j
        while i < end:
            v = toks[i].v
            if v in ("(", "[", "{") and i in sf.close:
                if v == "{" and kind in BRACE_ITEMS:
                    return sf.close[i] + 1
                i = sf.close[i] + 1
                continue
            if v in (")", "]", "}"):  # the enclosing block ends: a field or last arm
                return i
            if v == ";":
                return i + 1
            if v == "," and kind not in BRACE_ITEMS and kind not in SEMI_ITEMS:
                return i + 1
            i += 1
        return end

    def _mod_file(self, name: str, child_dir: str, path_attr: str | None, decl_dir: str):
        if path_attr is not None:
            f = os.path.normpath(os.path.join(decl_dir, path_attr))
            return f, os.path.dirname(f)  # a #[path] file is read as a mod.rs file
        for f, cd in ((os.path.join(child_dir, name + ".rs"), os.path.join(child_dir, name)),
                      (os.path.join(child_dir, name, "mod.rs"), os.path.join(child_dir, name))):
            if os.path.isfile(f):
                return f, cd
        return None, None

    def _scan(self, sf: SourceFile, i: int, end: int, mod: Module, child_dir: str, inline: bool):
        toks = sf.toks
        attrs: list[tuple[str, str]] = []  # (stripped text, raw text) of pending outer attributes
        while i < end:
            v = toks[i].v
            if v == "#" and i + 1 < end and toks[i + 1].v in ("[", "!"):
                k = i + 1 + (toks[i + 1].v == "!")
                if k < end and toks[k].v == "[" and k in sf.close:
                    c = sf.close[k]
                    text = re.sub(r"\s+", "", sf.text(k + 1, c - 1)) if c > k + 1 else ""
                    if toks[i + 1].v == "!":
                        if CFG_TEST.match(text):  # #![cfg(test)]: the whole module is test code
                            del self.modules[mod.path]
                            parent = self.modules.get(mod.path[:-1])
                            if parent is not None:
                                parent.children.pop(mod.path[-1], None)
                            return
                    else:
                        attrs.append((text, sf.raw(k + 1, c - 1) if c > k + 1 else ""))
                    i = c + 1
                    continue
            if attrs and v not in QUALIFIERS:
                # the item the attributes belong to starts here (its visibility was passed)
                cfg_test = any(CFG_TEST.match(a) for a, _ in attrs)
                path_attr = next((m.group(1) for _, r in attrs if (m := PATH_ATTR.match(r))), None)
                attrs = []
                if v == "mod":
                    i = self._mod_decl(sf, i, end, mod, child_dir, inline, cfg_test, path_attr)
                    continue
                if cfg_test:
                    i = self._item_end(sf, i, end)
                    continue
            if v == "pub" and i + 1 < end and toks[i + 1].v == "(" and (i + 1) in sf.close:
                i = sf.close[i + 1] + 1  # pub(crate), pub(super), pub(in path): not references
                continue
            if v == "mod" and i + 2 < end and is_ident(toks[i + 1].v) and toks[i + 2].v in (";", "{"):
                i = self._mod_decl(sf, i, end, mod, child_dir, inline, False, None)
                continue
            if v == "use" and i + 1 < end and toks[i + 1].v != "<":
                i = self._use(sf, i + 1, end, mod)
                continue
            if is_ident(v) and not (i > 0 and toks[i - 1].v in ("::", ".")):
                segs = [v]
                j = i
                while j + 2 < end and toks[j + 1].v == "::" and is_ident(toks[j + 2].v):
                    j += 2
                    segs.append(toks[j].v)
                if len(segs) > 1:
                    mod.refs.append(Ref(tuple(segs), rel(sf.path), sf.line(j)))
                i = j + 1
                continue
            i += 1

    def _mod_decl(self, sf, k, end, mod, child_dir, inline, cfg_test, path_attr) -> int:
        toks = sf.toks
        if k + 2 >= end or not is_ident(toks[k + 1].v) or toks[k + 2].v not in (";", "{"):
            return k + 1
        name, opener = toks[k + 1].v, k + 2
        after = (sf.close.get(opener, end - 1) + 1) if toks[opener].v == "{" else opener + 1
        if cfg_test:
            return after
        path = mod.path + (name,)
        if toks[opener].v == "{":
            child = Module(path, rel(sf.path))
            self.modules[path] = child
            mod.children[name] = child
            self._scan(sf, opener + 1, after - 1, child, os.path.join(child_dir, name), inline=True)
            return after
        decl_dir = child_dir if inline else os.path.dirname(sf.path)
        f, cd = self._mod_file(name, child_dir, path_attr, decl_dir)
        if f is None or not os.path.isfile(f):
            warn(f"{rel(sf.path)}:{sf.line(k)}: no file for `mod {name};` (looked in {rel(child_dir)})")
            child = Module(path, rel(sf.path))
            self.modules[path] = child
            mod.children[name] = child
            return after
        mod.children[name] = self._load(f, path, cd)
        if path not in self.modules:  # #![cfg(test)] inside the file
            mod.children.pop(name, None)
        return after

    def _use(self, sf: SourceFile, i: int, end: int, mod: Module) -> int:
        """Parses a use tree starting at token i; returns the index after its `;`."""
        toks = sf.toks

        def tree(i: int, prefix: tuple[str, ...]) -> int:
            segs = list(prefix)
            if i < end and toks[i].v == "::":
                i += 1
            while i < end:
                v = toks[i].v
                if v == "{" and i in sf.close:
                    c = sf.close[i]
                    j = i + 1
                    while j < c:
                        j = tree(j, tuple(segs))
                        if j < c and toks[j].v == ",":
                            j += 1
                        elif j < c:  # unexpected token: skip to the next item
                            while j < c and toks[j].v != ",":
                                j += 1
                    return c + 1
                if v == "*":
                    if segs:
                        mod.refs.append(Ref(tuple(segs), rel(sf.path), sf.line(i), glob=True, is_use=True))
                    return i + 1
                if is_ident(v):
                    segs.append(v)
                    last = i
                    i += 1
                    if i < end and toks[i].v == "::":
                        i += 1
                        continue
                    alias = None
                    if i + 1 < end and toks[i].v == "as":
                        alias = toks[i + 1].v
                        i += 2
                    if alias is None:
                        alias = segs[-2] if segs[-1] == "self" and len(segs) > 1 else segs[-1]
                    full = tuple(segs[:-1]) if segs[-1] == "self" and len(segs) > 1 else tuple(segs)
                    mod.refs.append(Ref(full, rel(sf.path), sf.line(last), alias=alias, is_use=True))
                    return i
                return i  # `,` `}` `;` or something unexpected
            return i

        j = tree(i, ())
        while j < end and toks[j].v != ";":
            j += 1
        return j + 1


def rel(path: str) -> str:
    return os.path.relpath(path, REPO) if os.path.isabs(path) else path


# ---------------------------------------------------------------------------------------
# Resolution and the graph.


@dataclass
class Graph:
    label: str
    nodes: list[tuple[str, ...]]
    # (src, dst) -> references (file, line) making the edge, in source order
    edges: dict[tuple[tuple[str, ...], tuple[str, ...]], list[tuple[str, int]]]


def build_graph(crate: Crate) -> Graph:
    modules = crate.modules
    bindings: dict[tuple[str, ...], dict[str, tuple[str, ...]]] = {p: {} for p in modules}

    def resolve(at: tuple[str, ...], segs: tuple[str, ...]):
        """(deepest module the path goes through, whether the whole path is that module)."""
        first, rest = segs[0], list(segs[1:])
        if first in ("crate", "$crate"):
            cur = ()
        elif first == "self":
            cur = at
        elif first == "super":
            if not at:
                return None, False
            cur = at[:-1]
            while rest and rest[0] == "super":
                if not cur:
                    return None, False
                cur, rest = cur[:-1], rest[1:]
        elif first in modules[at].children:
            cur = at + (first,)
        elif first in bindings[at]:
            cur = bindings[at][first]
        else:
            return None, False
        for s in rest:
            if s in modules[cur].children:
                cur = cur + (s,)
            elif s in bindings[cur] and bindings[cur][s] != cur:
                cur = bindings[cur][s]
            else:
                return cur, False
        return cur, True

    # names `use` binds to modules, to a fixpoint (uses may go through other uses and globs)
    for _ in range(50):
        changed = False
        for p, m in modules.items():
            b = bindings[p]
            for r in m.refs:
                if not r.is_use:
                    continue
                target, exact = resolve(p, r.segs)
                if target is None or not exact:
                    continue
                if r.glob:
                    new = {n: c.path for n, c in modules[target].children.items()}
                    new.update({n: t for n, t in bindings[target].items() if n not in new})
                    for n, t in new.items():
                        if n not in modules[p].children and b.get(n) is None and t != p:
                            b[n] = t
                            changed = True
                elif r.alias and r.alias != "_" and r.alias not in modules[p].children:
                    if b.get(r.alias) != target and target != p:
                        b[r.alias] = target
                        changed = True
        if not changed:
            break

    edges: dict = defaultdict(list)
    for p, m in modules.items():
        for r in m.refs:
            target, _ = resolve(p, r.segs)
            if target is not None and target != p:
                edges[(p, target)].append((r.file, r.line))
    return Graph(crate.label, sorted(modules), dict(edges))


def tarjan(nodes, succ) -> list[list]:
    """Strongly connected components (iterative Tarjan), each sorted, in discovery order."""
    index: dict = {}
    low: dict = {}
    on_stack: set = set()
    stack: list = []
    sccs: list[list] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(succ.get(start, ())))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ.get(w, ()))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                u = work[-1][0]
                low[u] = min(low[u], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                sccs.append(sorted(comp))
    return sccs


def cycles_of(nodes, edge_set) -> list[list]:
    succ: dict = defaultdict(list)
    for a, b in sorted(edge_set):
        succ[a].append(b)
    return [c for c in tarjan(nodes, succ) if len(c) > 1]


def cycle_edges(nodes, edge_set) -> set:
    comp = {}
    for n, c in enumerate(cycles_of(nodes, edge_set)):
        for m in c:
            comp[m] = n
    return {(a, b) for a, b in edge_set if a in comp and comp.get(b) == comp[a]}


# ---------------------------------------------------------------------------------------
# Crates to check, baseline, report.


def workspace_crates() -> list[str]:
    path = os.path.join(REPO, "Cargo.toml")
    try:
        import tomllib  # Python 3.11+

        with open(path, "rb") as f:
            members = tomllib.load(f).get("workspace", {}).get("members", [])
    except ImportError:
        with open(path, encoding="utf-8") as f:
            m = re.search(r"^\s*members\s*=\s*\[(.*?)\]", f.read(), re.M | re.S)
        members = re.findall(r'"([^"]+)"', m.group(1)) if m else []
    out = []
    for m in members:
        out.extend(sorted(glob.glob(os.path.join(REPO, m))) if any(c in m for c in "*?[") else [os.path.join(REPO, m)])
    return out


def crate_targets(crate_dir: str) -> list[tuple[str, str]]:
    """(label, root file) of each target of the crate in crate_dir."""
    label = rel(os.path.abspath(crate_dir)).replace(os.sep, "/")
    src = os.path.join(crate_dir, "src")
    out = []
    if os.path.isfile(os.path.join(src, "lib.rs")):
        out.append((label, os.path.join(src, "lib.rs")))
    if os.path.isfile(os.path.join(src, "main.rs")):
        out.append((f"{label}:main", os.path.join(src, "main.rs")))
    for f in sorted(glob.glob(os.path.join(src, "bin", "*.rs"))):
        out.append((f"{label}:bin:{os.path.basename(f)[:-3]}", f))
    for f in sorted(glob.glob(os.path.join(src, "bin", "*", "main.rs"))):
        out.append((f"{label}:bin:{os.path.basename(os.path.dirname(f))}", f))
    return out


def analyze(crate_dirs: list[str]) -> list[Graph]:
    graphs = []
    for d in crate_dirs:
        targets = crate_targets(d)
        if not targets:
            raise SystemExit(f"check-module-cycles: {rel(d)}: no src/lib.rs, src/main.rs or src/bin/*.rs")
        for label, root in targets:
            graphs.append(build_graph(Crate(label, os.path.abspath(root))))
    return graphs


def read_baseline(path: str) -> set[tuple[str, str, str]]:
    out = set()
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            s = line.split("#", 1)[0].strip()
            if not s:
                continue
            m = re.fullmatch(r"(\S+)\s+(\S+)\s*->\s*(\S+)", s)
            if not m:
                raise SystemExit(f"check-module-cycles: {path}:{n}: expected `<crate> <module> -> <module>`: {line.rstrip()}")
            out.add((m.group(1), m.group(2), m.group(3)))
    return out


def baseline_line(e: tuple[str, str, str]) -> str:
    return f"{e[0]} {e[1]} -> {e[2]}"


BASELINE_HEADER = """\
# Known module import-cycle edges, checked by scripts/check-module-cycles.py (scripts/test.sh).
# One edge a line: <crate> <module> -> <module>. This list may only shrink: the check fails
# on a cycle edge missing here and on a line here whose edge is no longer in a cycle.
# Regenerate with: python3 scripts/check-module-cycles.py --write-baseline
"""


def write_baseline(path: str, graphs: list[Graph]) -> int:
    labels = {g.label for g in graphs}
    kept = {e for e in read_baseline(path) if e[0] not in labels}
    current = set()
    for g in graphs:
        for a, b in cycle_edges(g.nodes, g.edges.keys()):
            current.add((g.label, mod_name(a), mod_name(b)))
    lines = sorted(kept | current)
    with open(path, "w", encoding="utf-8") as f:
        f.write(BASELINE_HEADER)
        for e in lines:
            f.write(baseline_line(e) + "\n")
    print(f"check-module-cycles: wrote {len(lines)} edge(s) to {rel(path)}")
    return 0


def snippet(file: str, line: int) -> str:
    try:
        with open(os.path.join(REPO, file), encoding="utf-8") as f:
            for n, text in enumerate(f, 1):
                if n == line:
                    t = " ".join(text.split())
                    return t if len(t) <= 90 else t[:87] + "..."
    except OSError:
        pass
    return ""


def check(graphs: list[Graph], baseline: set | None, verbose: bool, out=sys.stdout) -> tuple[int, set, set]:
    """Prints the report; returns (status, new edges, stale baseline edges)."""
    labels = {g.label for g in graphs}
    known = {e for e in (baseline or set()) if e[0] in labels}
    all_current: set = set()
    new_edges: set = set()
    for g in graphs:
        sccs = cycles_of(g.nodes, g.edges.keys())
        cyc = cycle_edges(g.nodes, g.edges.keys())
        named = {(g.label, mod_name(a), mod_name(b)) for a, b in cyc}
        all_current |= named
        new = named - known if baseline is not None else named
        new_edges |= new
        print(f"{g.label}: {len(g.nodes)} modules, {len(g.edges)} edges, {len(sccs)} cycle(s)"
              + (f" ({sum(map(len, sccs))} modules, {len(cyc)} edges in cycles"
                 + (f", {len(new)} not in the baseline" if baseline is not None else "") + ")" if sccs else ""),
              file=out)
        for n, comp in enumerate(sccs, 1):
            inside = sorted((a, b) for a, b in cyc if a in comp and b in comp)
            comp_new = [e for e in inside if (g.label, mod_name(e[0]), mod_name(e[1])) in new]
            print(f"  cycle {n}: {len(comp)} modules: {', '.join(mod_name(m) for m in comp)}", file=out)
            if not comp_new and not verbose:
                print(f"    all {len(inside)} edges are in the baseline (-v lists them)", file=out)
                continue
            for a, b in inside:
                file, line = g.edges[(a, b)][0]
                mark = "NEW " if (g.label, mod_name(a), mod_name(b)) in new and baseline is not None else ""
                more = f" (+{len(g.edges[(a, b)]) - 1} more)" if len(g.edges[(a, b)]) > 1 else ""
                print(f"    {mark}{mod_name(a)} -> {mod_name(b)}   {file}:{line}{more}   {snippet(file, line)}", file=out)
    stale = known - all_current
    status = 0
    if new_edges:
        status = 1
        what = "cycle edge(s) not in the baseline" if baseline is not None else "cycle edge(s)"
        print(f"check-module-cycles: FAILED: {len(new_edges)} {what}: break the cycle "
              "(no module may import one that imports it back)", file=out)
    if stale:
        status = 1
        print(f"check-module-cycles: FAILED: {len(stale)} baseline edge(s) no longer in a cycle; "
              "delete these lines from the baseline:", file=out)
        for e in sorted(stale):
            print(f"  {baseline_line(e)}", file=out)
    if status == 0:
        print("check-module-cycles: OK", file=out)
    return status, new_edges, stale


def rank(graphs: list[Graph], top: int) -> None:
    """The cycle edges whose removal takes the most edges (and modules) out of cycles."""
    rows = []
    for g in graphs:
        es = set(g.edges)
        cyc = cycle_edges(g.nodes, es)
        if not cyc:
            continue
        before_mods = {m for e in cyc for m in e}
        for e in cyc:
            after = cycle_edges(g.nodes, es - {e})
            after_mods = {m for x in after for m in x}
            rows.append((len(cyc) - len(after), len(before_mods) - len(after_mods), g.label, e,
                         len(g.edges[e])))
        deg: dict = defaultdict(lambda: [0, 0])
        for a, b in cyc:
            deg[a][0] += 1
            deg[b][1] += 1
        print(f"{g.label}: modules by cycle edges; cycle edges left when all of a module's "
              f"outgoing (or incoming) ones are cut, of {len(cyc)}:")
        for m, (o, i) in sorted(deg.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:top]:
            left_out = len(cycle_edges(g.nodes, {e for e in es if e[0] != m or e not in cyc}))
            left_in = len(cycle_edges(g.nodes, {e for e in es if e[1] != m or e not in cyc}))
            print(f"  {mod_name(m):28} out {o:3} (cut: {left_out:3} left)  in {i:3} (cut: {left_in:3} left)")
    rows.sort(key=lambda r: (-r[0], -r[1], r[4], r[2], r[3]))
    print(f"top {top} edges by cycle edges their removal clears (edges cleared, modules leaving cycles, refs):")
    for edges_cleared, mods_cleared, label, (a, b), refs in rows[:top]:
        file, line = next(iter(graphs_by_label(graphs)[label].edges[(a, b)]))
        print(f"  {label} {mod_name(a)} -> {mod_name(b)}: {edges_cleared} edges, {mods_cleared} modules, "
              f"{refs} ref(s), e.g. {file}:{line}")


def graphs_by_label(graphs):
    return {g.label: g for g in graphs}


# ---------------------------------------------------------------------------------------
# Self-test.


def self_test(verbose: bool) -> int:
    import io

    failures = []
    section = ""
    base = os.path.join(REPO, FIXTURES)

    checks = 0

    def expect(cond: bool, what: str) -> None:
        nonlocal checks
        checks += 1
        if verbose or not cond:
            print(f"  {'ok  ' if cond else 'FAIL'} {section}: {what}")
        if not cond:
            failures.append(what)

    def one(name: str) -> Graph:
        graphs = analyze([os.path.join(base, name)])
        return graphs[0]

    def edge_names(g: Graph) -> set:
        return {(mod_name(a), mod_name(b)) for a, b in g.edges}

    section = "cycle/"
    g = one("cycle")
    sccs = [[mod_name(m) for m in c] for c in cycles_of(g.nodes, g.edges.keys())]
    expect(any({"a", "b::c"} <= set(c) for c in sccs), f"a cycle through a and b::c is found (got {sccs})")
    expect(("a", "b::c") in edge_names(g), "a -> b::c from the inline path crate::b::c::f()")
    expect(("b::c", "a") in edge_names(g), "b::c -> a from the grouped use crate::{a::X}")
    expect(("crate", "b::c") in edge_names(g), "crate -> b::c from the re-export pub use b::c::...")
    buf = io.StringIO()
    status, _, _ = check([g], None, False, out=buf)
    expect(status == 1 and "a -> b::c" in buf.getvalue() and "b::c -> a" in buf.getvalue(),
           "the check fails and prints both edges of the cycle with file:line")
    label = g.label
    full = {(label, "a", "b::c"), (label, "b::c", "a")}
    expect(check([g], full, False, out=io.StringIO())[0] == 0, "passes when the baseline lists the cycle")
    st, new, _ = check([g], {(label, "a", "b::c")}, False, out=io.StringIO())
    expect(st == 1 and new == {(label, "b::c", "a")}, "fails on a cycle edge missing from the baseline")
    st, _, stale = check([g], full | {(label, "b", "a")}, False, out=io.StringIO())
    expect(st == 1 and stale == {(label, "b", "a")}, "fails on a baseline edge no longer in a cycle")
    expect(check([g], full | {("other-crate", "x", "y")}, False, out=io.StringIO())[0] == 0,
           "ignores baseline lines of crates not checked")

    section = "parent-child/"
    g = one("parent-child")
    sccs = [[mod_name(m) for m in c] for c in cycles_of(g.nodes, g.edges.keys())]
    expect(["queue", "queue::executor"] in sccs,
           f"queue (`use executor::run`) and queue::executor (`super::QueueState`) are a cycle (got {sccs})")

    section = "acyclic/"
    g = one("acyclic")
    names = {mod_name(m) for m in g.nodes}
    sccs = [[mod_name(m) for m in c] for c in cycles_of(g.nodes, g.edges.keys())]
    expect(sccs == [], f"no cycle (got {sccs})")
    expect(check([g], None, False, out=io.StringIO())[0] == 0, "the check passes")
    expect({"crate", "a", "b", "b::c", "b::inner"} <= names, f"modules found (got {sorted(names)})")
    expect(not any("tests" in n or "test_util" in n for n in names), "#[cfg(test)] modules are not in the graph")
    en = edge_names(g)
    for e in [("a", "b::c"), ("crate", "b::c"), ("b::c", "b::inner"), ("b::c", "b"),
              ("b::inner", "b"), ("a", "b::inner")]:
        expect(e in en, f"real edge {e[0]} -> {e[1]} found")
    expect(not any(dst == "a" for _, dst in en), f"no decoy edge into a (edges: {sorted(en)})")

    if failures:
        print(f"check-module-cycles self-test: FAILED ({len(failures)} of {checks} checks)")
        return 1
    print(f"check-module-cycles self-test: OK ({checks} checks on {FIXTURES})")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("crates", nargs="*", help="crate directories (default: the workspace members)")
    ap.add_argument("--baseline", default=DEFAULT_BASELINE, help="known cycle edges (default: %(default)s)")
    ap.add_argument("--no-baseline", action="store_true", help="fail on any cycle")
    ap.add_argument("--write-baseline", action="store_true", help="write the current cycle edges to the baseline")
    ap.add_argument("--rank", type=int, metavar="N", help="print the N cycle edges whose removal clears the most")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every edge of known cycles too")
    ap.add_argument("--self-test", action="store_true", help="check the fixtures in " + FIXTURES)
    args = ap.parse_args()
    os.chdir(REPO)
    if args.self_test:
        return self_test(args.verbose)
    dirs = [os.path.abspath(d) for d in args.crates] or workspace_crates()
    graphs = analyze(dirs)
    baseline_path = os.path.join(REPO, args.baseline)
    if args.write_baseline:
        return write_baseline(baseline_path, graphs)
    if args.rank:
        rank(graphs, args.rank)
        return 0
    baseline = None if args.no_baseline else read_baseline(baseline_path)
    if baseline is not None and not os.path.exists(baseline_path):
        warn(f"{rel(baseline_path)} does not exist: every cycle fails")
    return check(graphs, baseline, args.verbose)[0]


if __name__ == "__main__":
    sys.exit(main())
