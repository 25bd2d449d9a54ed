"""Size of the hand-written HTTP/RPC code: the server, its wire format, the clients and the
engine RPC, counted the same way for the stdlib-based stack it replaced and for today's.

Counted: source lines holding code, i.e. not blank, not only a comment, not part of a
docstring (module, class or function); a statement wrapped over several lines counts each
line. Counted per file, minus the definitions named in its exclusion list: code that lives in
those files but is not HTTP/RPC (the attacker gate and the demo model of the serving entry
point, judge probing semantics, the top-k forward pass, starting and stopping engine
processes). The same kinds of definitions are excluded on both sides. The replica router and
the failure-rate warning count on both sides (old: inside ``game/endpoint.py``; new:
``net.py``).

Both sides are counted in the same layout: the tree is kept formatted by ``ruff format``
(``.ci/run`` checks it), and the old files were passed through the same formatter, with this
project's settings, before counting. The old numbers are data: they were measured once from the
commit that held the stdlib stack with ``python tests/test_http_code_size.py f593e35`` (this
file's ``__main__``: ``git show`` of each OLD file, ``ruff format``, the same counter).
"""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# path -> names of top-level definitions ("name" or "Class.method") that are not HTTP/RPC.
OLD_FILES = {
    "advgame_jax/sampling/server.py": (
        "ATTACKER_MARKER_FILES",
        "ATTACKER_CONFIG_FIELDS",
        "AttackerCheckpointError",
        "is_attacker_checkpoint",
        "check_servable",
        "make_tiny_model_dir",
    ),
    "advgame_jax/sampling/openai_protocol.py": (),
    "advgame_jax/sampling/bounded_http.py": (),
    "advgame_jax/game/endpoint.py": (),  # the judge's HTTP client with its router and warning
    "advgame_jax/evaluation/http_client.py": (),
    # the pickle RPC (engine side and trainer side); not: building vLLM, the engine's process
    # setup, spawning and stopping the process
    "advgame_jax/sampling/engine_process.py": (
        "EngineSpec",
        "_build_sampler",
        "_exit_when_stdin_closes",
        "main",
        "EngineClient.spawn",
        "EngineClient.close",
    ),
}
# Measured at f593e35 (see the module docstring).
OLD_COUNTS = {
    "advgame_jax/sampling/server.py": 352,
    "advgame_jax/sampling/openai_protocol.py": 293,
    "advgame_jax/sampling/bounded_http.py": 49,
    "advgame_jax/game/endpoint.py": 312,
    "advgame_jax/evaluation/http_client.py": 113,
    "advgame_jax/sampling/engine_process.py": 198,
}

NEW_FILES = {
    "advgame_jax/sampling/server.py": (),
    "advgame_jax/sampling/openai_schema.py": (),
    "advgame_jax/sampling/http_guard.py": (),
    "advgame_jax/net.py": (),  # client, router + failure-rate warning (old: in endpoint.py)
    "advgame_jax/game/endpoint.py": (
        "_PROBE_SEED",
        "_PROBE_ATTACK",
        "_PROBE_FIELDS",
        "probe_judge",
    ),
    "advgame_jax/evaluation/http_client.py": (),
    "advgame_jax/sampling/engines.py": (
        "SERVER_MODULE",
        "EngineSpec",
        "server_command",
        "_free_port",
        "_LAUNCHER",
        "EngineClient.spawn",
        "EngineClient.close",
        "_kill_group",
        "_kill_orphans",
    ),
}


def _definitions(tree: ast.Module):
    """(name, node) of each top-level statement that defines something, and of each method."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name, node
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        yield f"{node.name}.{sub.name}", sub
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        yield n.id, node


def _span(node) -> range:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return range(first, node.end_lineno + 1)


def code_lines(source: str, exclude=()) -> int:
    """Lines of ``source`` holding code (module docstring), minus the definitions in ``exclude``."""
    tree = ast.parse(source)
    skip: set[int] = set()
    for node in [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]:
        body = node.body
        if (
            body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            skip.update(_span(body[0]))
    found = {name: node for name, node in _definitions(tree)}
    missing = [n for n in exclude if n not in found]
    if missing:
        raise KeyError(f"no definition named {missing}")
    for name in exclude:
        skip.update(_span(found[name]))
    lines: set[int] = set()
    ignored = {
        tokenize.COMMENT,
        tokenize.NL,
        tokenize.NEWLINE,
        tokenize.INDENT,
        tokenize.DEDENT,
        tokenize.ENCODING,
        tokenize.ENDMARKER,
    }
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in ignored:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - skip)


def count_tree(files: dict, read) -> dict:
    return {path: code_lines(read(path), exclude) for path, exclude in files.items()}


def test_counter_on_a_hand_counted_source():
    src = (
        '"""Module\n docstring."""\n\nimport os  # a comment\n\n# only a comment\n'
        'X = {\n    "a": 1,\n}\n\n\nclass A:\n    """Doc."""\n\n    def f(self):\n'
        '        """Doc\n        more."""\n        return (1 +\n                2)\n\n'
        '    def g(self):\n        return """not a\ndocstring"""\n\n\n'
        "@staticmethod\ndef h():\n    pass\n"
    )
    # import, X's 3 lines, class line, def f, return's 2 lines, def g, its return's 2 lines,
    # the decorator, def h, pass
    assert code_lines(src) == 1 + 3 + 1 + 1 + 2 + 1 + 2 + 1 + 1 + 1
    assert code_lines(src, ("A.g",)) == 14 - 3
    assert code_lines(src, ("h", "X")) == 14 - 3 - 3
    assert code_lines(src, ("A",)) == 14 - 7


def _new_counts() -> dict:
    def read(path):
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            return f.read()

    return count_tree(NEW_FILES, read)


# Today's total (measured with this counter when the ceiling was last lowered): the code may
# shrink, not grow, until it meets the target below.
CEILING = 1249


def test_http_code_does_not_grow():
    new = _new_counts()
    assert sum(new.values()) <= CEILING, f"hand-written HTTP/RPC code grew: {new}"


@pytest.mark.xfail(
    strict=True,
    reason=(
        "not met: 1,249 lines against the stdlib stack's 1,317 (target 658); what is left is "
        "what the tests pin. Server side 558 (old 694): FastAPI routes, auth, the 16x body "
        "limit (19), one batching worker with a real wait queue and a computed Retry-After "
        "(_overloaded 19, _work 20, _run 16), graceful shutdown, the total read deadline "
        "(http_guard 33), the request models with the exact 400 messages of test_serve*.py "
        "(_explain + tables 36, parse 63), top_logprobs and one-chunk-per-choice streaming. "
        "Client side 492 (old 425): the openai SDK's retry policy (3.60) is not the pinned one "
        "(no retry of a malformed 2xx; a Retry-After up to 120 s slept even past the request's "
        "deadline instead of failing at once; a fixed unseeded 0.5 s * 2^n backoff, no "
        "injectable sleep), so net.py keeps its loop: deadline across retries, "
        "Retry-After, seeded backoff, per-attempt fault kinds and body limit (request 45, "
        "_attempt 26, _fetch 9, errors and Retry-After parsing 26), the replica router (63) and the failure-rate "
        "warning (37), plus the judge and eval wrappers (80 + 79). Engines 199 (old pickle "
        "RPC 198): vLLM's own server over HTTP (readiness, a dead engine named, pause / "
        "collective_rpc / reset / version / resume, token-id generation with weight-version "
        "spans)"
    ),
)
def test_http_code_is_at_most_half_of_the_stdlib_stack():
    new = _new_counts()
    old_total, new_total = sum(OLD_COUNTS.values()), sum(new.values())
    assert old_total == 1317  # the recorded measurement, not a placeholder
    assert new_total <= 0.5 * old_total, (
        f"hand-written HTTP/RPC code: {new_total} lines now, {old_total} in the stdlib stack "
        f"(limit {0.5 * old_total:.0f}); per file: {new}"
    )


if __name__ == "__main__":  # python tests/test_http_code_size.py <git revision of the old stack>
    rev = sys.argv[1] if len(sys.argv) > 1 else "f593e35"

    def git_show(path):
        src = subprocess.run(
            ["git", "-C", ROOT, "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
        ).stdout
        return subprocess.run(  # the same layout as the tree (ruff from the dev extra)
            ["ruff", "format", "--stdin-filename", os.path.join(ROOT, path), "-"],
            input=src,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def read_here(path):
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            return f.read()

    for title, files, read in (("old", OLD_FILES, git_show), ("new", NEW_FILES, read_here)):
        counts = count_tree(files, read)
        for path, n in counts.items():
            print(f"{title} {path}: {n}")
        print(f"{title} total: {sum(counts.values())}")
