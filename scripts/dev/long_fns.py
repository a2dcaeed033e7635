#!/usr/bin/env python3
"""The size rule of the tree: no Rust source file over 600 lines and no function over 80 lines
(from the `fn` line to its closing brace) without a one-line reason in its header. The reason is a
comment line containing `Why long:` — in a file's leading `//!` header, or among the doc comment,
comment and attribute lines directly above a function.

Usage: long_fns.py [--all] [FN_LIMIT [FILE_LIMIT]] [ROOTS...]  (defaults 80, 600, crates xtask).
Prints each long function or file that has no reason (with --all: every long one, reasons
marked) and exits 1 when any lacks one. Brace matching is crude (it skips strings, chars and
comments well enough for this tree).
"""
import re, sys, pathlib

args = sys.argv[1:]
show_all = "--all" in args
args = [a for a in args if a != "--all"]
limits = [int(a) for a in args if a.isdigit()]
fn_limit = limits[0] if limits else 80
file_limit = limits[1] if len(limits) > 1 else 600
roots = [a for a in args if not a.isdigit()] or ["crates", "xtask"]
REASON = "Why long:"
fn_re = re.compile(r'^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+"C"\s+)?fn\s+(\w+)')


def strip(line):
    """The line without comments, string and char literals."""
    out = []
    i = 0
    n = len(line)
    while i < n:
        c = line[i]
        if line.startswith('//', i):
            break
        if c == '"':
            i += 1
            while i < n and line[i] != '"':
                i += 2 if line[i] == '\\' else 1
            i += 1
            continue
        if c == "'" and i + 2 < n and (line[i + 2] == "'" or line[i + 1] == '\\'):
            j = line.find("'", i + 2 if line[i + 1] != '\\' else i + 3)
            i = j + 1 if j > 0 else n
            continue
        out.append(c)
        i += 1
    return ''.join(out)


def reason_above(lines, i):
    """Whether the comment/attribute lines directly above line i hold a reason."""
    j = i - 1
    while j >= 0:
        s = lines[j].strip()
        if not (s.startswith('//') or s.startswith('#[')):
            return False
        if REASON in s:
            return True
        j -= 1
    return False


def file_reason(lines):
    """Whether the file's leading `//!` header holds a reason."""
    for line in lines:
        s = line.strip()
        if not s.startswith('//!'):
            return False
        if REASON in s:
            return True
    return False


missing = 0


def report(length, where, name, has_reason):
    global missing
    if not has_reason:
        missing += 1
    if show_all or not has_reason:
        print(f"{length:4d} {where} {name}{'  (reason given)' if has_reason else ''}")


for root in roots:
    for p in sorted(pathlib.Path(root).rglob("*.rs")):
        if "target" in p.parts:
            continue
        lines = p.read_text().split('\n')
        if len(lines) - 1 > file_limit:
            report(len(lines) - 1, p, "(file)", file_reason(lines))
        for i, line in enumerate(lines):
            m = fn_re.match(line)
            if not m:
                continue
            depth = 0
            started = False
            j = i
            while j < len(lines):
                s = strip(lines[j])
                if not started and ';' in s and '{' not in s:
                    break
                depth += s.count('{') - s.count('}')
                if '{' in s:
                    started = True
                if started and depth <= 0:
                    break
                j += 1
            length = j - i + 1
            if started and length > fn_limit:
                report(length, f"{p}:{i + 1}", m.group(7), reason_above(lines, i))

if missing:
    print(f"{missing} long functions or files without a `{REASON}` line", file=sys.stderr)
sys.exit(1 if missing else 0)
