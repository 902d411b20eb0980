"""The package's shape: one seam per decision (README "Layout").

Read from the source with ``ast`` (every import, those inside functions too), so these hold
whatever is installed:

- no import cycle between files, and no import from a lower layer to a higher one;
- the models (``sd4match.features``) import nothing of the prompts, the batcher, the store,
  the data or the stages;
- outside ``sd4match/prompts/`` no code compares a prompt kind with a string literal, and
  nowhere does code ``hasattr``/``getattr`` a featurizer for a capability;
- our own modules are imported at the top of each file, except in the command line;
- the closed sets of names (``sd4match.config``) agree with the registries that fill them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sd4match"

#: lowest first; a module may import its own layer and those below it
LAYERS = [
    ("base", {"version", "errors", "config", "fileio", "pixels", "runtime", "store"}),
    ("core", {"data", "matching", "loss", "metrics", "viz"}),
    ("models", {"features"}),
    ("prompts", {"prompts"}),
    ("batching", {"batching"}),
    ("stages", {"extract", "evaluate", "checkpoint", "train", "usermatch", "serve", "checks", "testing", "reproduce", "sweep", "compare", "env"}),
    ("top", {"cli", "__main__", "__init__"}),
]
LAZY_OK = {"cli.py", "__init__.py"}  # where our own modules may be imported inside functions (`sd4match --help` needs no torch)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def file_of(name: str) -> str | None:
    """The module of ours that ``import name`` runs last (``sd4match.a.b`` -> its file's module name)."""
    while name and name not in FILES:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, inside a function) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("sd4match"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("sd4match"):
                for a in child.names:  # `from sd4match.x import y`: y may be a module itself
                    sub = f"{child.module}.{a.name}"
                    out.append((sub if sub in FILES else child.module, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return out


GRAPH = {name: {file_of(m) for m, _, _ in imports(path)} - {None, name} for name, path in FILES.items()}


def layer(name: str) -> int:
    parts = name.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for i, (_, members) in enumerate(LAYERS):
        if key in members:
            return i
    raise AssertionError(f"{name}: in no layer of the README's Layout map; add it to LAYERS")


def test_every_module_has_a_layer():
    for name in FILES:
        layer(name)


def test_no_import_cycle_between_files():
    state: dict[str, int] = {}

    def walk(n, stack):
        state[n] = 1
        for m in sorted(GRAPH[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                walk(m, stack + [m])
        state[n] = 2

    for n in sorted(FILES):
        if n not in state:
            walk(n, [n])


def test_no_import_runs_up_a_layer():
    bad = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})" for a, deps in GRAPH.items() for b in deps
           if layer(b) > layer(a) and a != "sd4match"]
    assert not bad, bad


def test_models_import_nothing_above_them_nor_data_or_store():
    forbidden = ("sd4match.prompts", "sd4match.batching", "sd4match.store", "sd4match.data", "sd4match.evaluate", "sd4match.train",
                 "sd4match.usermatch", "sd4match.extract", "sd4match.checks", "sd4match.cli")
    bad = [f"{a} imports {b}" for a, deps in GRAPH.items() if a.startswith("sd4match.features") for b in deps if b.startswith(forbidden)]
    assert not bad, bad


def test_own_modules_are_imported_at_the_top():
    late = [f"{path.relative_to(SRC)}:{line} imports {m} inside a function" for name, path in FILES.items() if path.name not in LAZY_OK
            for m, line, inside in imports(path) if inside]
    assert not late, late


def _kind_names() -> set[str]:
    from sd4match.config import PromptKind

    return set(typing.get_args(PromptKind))


def test_no_prompt_kind_compared_with_a_literal_outside_prompts():
    kinds = _kind_names()
    found = []
    for name, path in FILES.items():
        if name.startswith("sd4match.prompts"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                consts = [c for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in kinds]
                if consts:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found


CAPABILITIES = {"posterior", "posterior_settings", "text_encoder", "tokenizer", "encode_text", "text_bridge", "needs_pixels", "takes_prompt",
                "has_posterior", "max_batch", "samples_per_picture", "prompt_dim", "reconfigure", "unet", "vae", "scheduler", "config"}


def test_no_featurizer_capability_is_sniffed():
    found = []
    for path in FILES.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") and len(node.args) >= 2:
                obj, attr = ast.unparse(node.args[0]), node.args[1]
                if "feat" in obj or (isinstance(attr, ast.Constant) and attr.value in CAPABILITIES and obj in ("self", "featurizer", "model")):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found


def test_the_closed_sets_agree_with_their_registries():
    from sd4match import config
    from sd4match.data import DATASETS
    from sd4match.matching import MATCH_RULES
    from sd4match.prompts import PROMPT_CLASSES, learned_kinds
    from sd4match.prompts.official import IMPORT_KINDS

    assert list(PROMPT_CLASSES) == list(typing.get_args(config.PromptKind))
    assert learned_kinds() == typing.get_args(config.LearnedKind)
    assert list(DATASETS) == list(typing.get_args(config.DatasetName))
    assert MATCH_RULES == typing.get_args(config.MatchRule) and MATCH_RULES[0] == "kernel-softargmax"
    assert set(IMPORT_KINDS) <= set(learned_kinds())


def test_import_sd4match_imports_no_torch_and_gives_the_public_names():
    code = ("import sys, sd4match; assert 'torch' not in sys.modules, 'torch'; "
            "sd4match.SDFeaturizer; sd4match.Matcher; sd4match.score; sd4match.load_prompt; sd4match.make_prompt; sd4match.match_pixels; "
            "sd4match.dense_match; sd4match.DinoFeaturizer; sd4match.load_featurizer; sd4match.Sd4MatchError; "
            "import sd4match.train; assert callable(sd4match.evaluate) and sd4match.evaluate.predict_pairs; print(sorted(sd4match.__all__))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        import sd4match

        sd4match.nothing  # noqa: B018
