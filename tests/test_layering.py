"""The architecture as a test: who may import whom, how long a function may be, and where JSON
records are read. Every module under src/openllama is parsed with `ast` (never imported), so the
rules see top-level, function-level and `TYPE_CHECKING` imports alike, relative or absolute.

Rules (each its own test below; a failure names module, file and line):
- foundation modules never import a higher layer (and labels/atomic/errors import nothing of
  openllama but errors);
- a training stage module never imports another stage module;
- no function is longer than MAX_FUNCTION_LINES lines;
- JSON/JSONL records are read in one place, records.py; `json.loads` & co. appear elsewhere
  only in JSON_ALLOWED, functions that parse one JSON document of a known kind.

The checkers are plain functions over (module name, source text), so the self-checks at the end
feed them synthetic modules and prove each rule can fail.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "openllama"

# The layers. A name covers the module and, when it is a package, everything in it.
FOUNDATION = ("openllama.config", "openllama.errors", "openllama.labels", "openllama.atomic", "openllama.artifacts",
              "openllama.records", "openllama.chat_template", "openllama.tokenizer", "openllama.model", "openllama.data")
# below data/: data.tokens uses the tokenizer, so the tokenizer (and what it stands on) never imports data
BELOW_DATA = ("openllama.tokenizer", "openllama.chat_template", "openllama.records", "openllama.model",
              "openllama.artifacts", "openllama.config")
HIGHER = ("openllama.train", "openllama.serve", "openllama.evaluate", "openllama.tasks", "openllama.pipeline",
          "openllama.report", "openllama.cli", "openllama.generate", "openllama.hf", "openllama.plan",
          "openllama.lm_eval_backend")
# leaves of the foundation: they may import openllama.errors and nothing else of openllama
LEAVES = ("openllama.labels", "openllama.atomic", "openllama.errors", "openllama.artifacts", "openllama.records")
LEAF_MAY_IMPORT = ("openllama.errors",)
# training stages: each may import openllama.train.{stage, engine, objectives, lora, logprobs, ...}, never another stage
STAGES = tuple(f"openllama.train.{s}" for s in ("pretrain", "sft", "reward", "dpo", "grpo"))

MAX_FUNCTION_LINES = 100

# The one JSON record reader (JSON lines and JSON arrays of any input corpus or chat/preference file).
JSON_READER = "openllama.records"
# Calls that parse JSON text: `json.loads(`, `orjson.loads(`, `json.load(` and `json.JSONDecoder`.
JSON_CALLS = {"json": ("loads", "load", "JSONDecoder"), "orjson": ("loads",)}
# Functions outside the reader allowed to parse JSON: each parses single documents of one known kind
# (a manifest, a config, trainer state, metrics lines, an HTTP body), never a user's record file.
# module -> {function qualname ("<module>" for module level): what it parses}. Kept explicit on
# purpose: a new entry is a decision, so add one only for such a document, with its reason.
# Not here, on purpose: data/chat.py, data/preference.py, tokenizer.py's record readers and tasks.py:
# their JSON/JSONL records go through records.py.
JSON_ALLOWED: dict[str, dict[str, str]] = {
    "openllama.model": {
        "read_model_config": "openllama.json, the model directory's own config",
    },
    "openllama.tokenizer": {
        "Tokenizer.load": "tokenizer_config.json of a tokenizer directory (one document)",
    },
    "openllama.hf": {
        "_read_hf_weights": "model.safetensors.index.json of a Hugging Face directory",
        "import_hf": "config.json of a Hugging Face directory",
    },
    "openllama.pipeline": {
        "_run_demo.evaluate": "eval/NAME.json that the demo's own `evaluate` command just wrote",
    },
    "openllama.report": {
        "collect_stage": "summary.json that a stage wrote",
    },
    "openllama.data.shards": {
        "load_manifest": "manifest.json of a shard directory",
        "iter_shard_lines": "lines of prepare's own jsonl.zst shards (their one reader)",
        "verify_shard": "checks that each line of its own shards is a JSON object",
    },
    "openllama.data.tokens": {
        "tokenize_shard": "lines of prepare's own shards, read in batches for the tokenizer",
        "TokenShards.__init__": "manifest.json of a token-shard directory",
    },
    "openllama.train.metrics": {
        "read_metrics": "metrics.jsonl that the engine writes (the one metrics reader)",
    },
    "openllama.train.checkpoint": {
        "check_model_matches": "a checkpoint's model/openllama.json",
        "load_trainer_state": "a checkpoint's state/trainer.json",
    },
    "openllama.serve.requests": {
        "parse_request": "an HTTP request body",
    },
}


# ----------------------------------------------------------------------------------------------
# reading the package


@dataclass(frozen=True)
class Module:
    name: str  # openllama.data.chat
    path: str  # src/openllama/data/chat.py, for messages
    source: str
    is_package: bool = False


def load_modules() -> list[Module]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out.append(Module(".".join(parts), str(path.relative_to(ROOT)), path.read_text(encoding="utf-8"), is_package))
    return out


MODULES = load_modules()
MODULE_NAMES = frozenset(m.name for m in MODULES)


def covers(prefixes: tuple[str, ...], name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Import:
    importer: Module
    target: str  # dotted name: the module imported (or the package, for names that are not modules)
    line: int

    def where(self) -> str:
        return f"{self.importer.path}:{self.line}: {self.importer.name} imports {self.target}"


def _resolve_relative(module: Module, level: int, name: str | None) -> str:
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    parts = package.split(".")
    if level - 1 >= len(parts):
        raise ValueError(f"{module.path}: relative import beyond the top-level package")
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{name}" if name else base


def imports_of(module: Module, known: frozenset[str] = MODULE_NAMES) -> list[Import]:
    """Every import of openllama in the module, at any depth, as the dotted module it reaches:
    `from ..train import checkpoint` in openllama.data.x -> openllama.train.checkpoint;
    `from .engine import train` in openllama.train.sft -> openllama.train.engine."""
    out = []
    for node in ast.walk(ast.parse(module.source, module.path)):
        if isinstance(node, ast.Import):
            out += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, node.level, node.module) if node.level else node.module
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                out.append(Import(module, candidate if candidate in known else base, node.lineno))
    unique = {(i.line, i.target): i for i in out if covers(("openllama",), i.target)}  # one per name, not per alias
    return [unique[k] for k in sorted(unique)]


# ----------------------------------------------------------------------------------------------
# the checkers: each returns one message per violation


def upward_imports(modules: list[Module], known: frozenset[str] = MODULE_NAMES) -> list[str]:
    problems = []
    for module in modules:
        if not covers(FOUNDATION, module.name):
            continue
        for imp in imports_of(module, known):
            if covers(HIGHER, imp.target):
                problems.append(f"{imp.where()} (a foundation module importing a higher layer)")
            elif module.name in LEAVES and not covers(LEAF_MAY_IMPORT, imp.target):
                problems.append(f"{imp.where()} ({module.name} may import only {', '.join(LEAF_MAY_IMPORT)})")
    return problems


def stage_to_stage_imports(modules: list[Module], known: frozenset[str] = MODULE_NAMES) -> list[str]:
    problems = []
    for module in modules:
        if module.name not in STAGES:
            continue
        for imp in imports_of(module, known):
            if covers(STAGES, imp.target) and not covers((module.name,), imp.target):
                problems.append(f"{imp.where()} (a stage importing another stage: share it through "
                                f"openllama.train.stage / engine / objectives / lora / logprobs instead)")
    return problems


class _Scopes(ast.NodeVisitor):
    """Visits a module keeping the qualified name of the enclosing function (`Class.method`,
    `outer.inner`; "<module>" at module level)."""

    def __init__(self):
        self.stack: list[str] = []

    @property
    def scope(self) -> str:
        return ".".join(self.stack) or "<module>"

    def _enter(self, node):
        self.stack.append(node.name)
        self.on_scope(node)
        self.generic_visit(node)
        self.stack.pop()

    def on_scope(self, node) -> None:
        pass

    visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _enter


def long_functions(modules: list[Module], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    problems = []
    for module in modules:
        class Lengths(_Scopes):
            def on_scope(self, node) -> None:
                length = node.end_lineno - node.lineno + 1
                if not isinstance(node, ast.ClassDef) and length > limit:
                    problems.append(f"{module.path}:{node.lineno}: {module.name}.{self.scope} is {length} lines "
                                    f"(limit {limit})")

        Lengths().visit(ast.parse(module.source, module.path))
    return problems


def json_parses(module: Module) -> list[tuple[str, int, str]]:
    """(enclosing function, line, what) for each use of a JSON parser in the module; follows
    `import json as j` and `from json import loads`."""
    found: list[tuple[str, int, str]] = []
    tree = ast.parse(module.source, module.path)
    libs: dict[str, str] = {}  # local name -> json / orjson
    direct: dict[str, str] = {}  # local name -> "json.loads"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            libs.update({(a.asname or a.name): a.name for a in node.names if a.name in JSON_CALLS})
        elif isinstance(node, ast.ImportFrom) and node.module in JSON_CALLS and not node.level:
            direct.update({(a.asname or a.name): f"{node.module}.{a.name}" for a in node.names
                           if a.name in JSON_CALLS[node.module]})

    class Finder(_Scopes):
        def visit_Attribute(self, node):
            lib = libs.get(node.value.id) if isinstance(node.value, ast.Name) else None
            if lib is not None and node.attr in JSON_CALLS[lib]:
                found.append((self.scope, node.lineno, f"{lib}.{node.attr}"))
            self.generic_visit(node)

        def visit_Name(self, node):
            if node.id in direct and isinstance(node.ctx, ast.Load):
                found.append((self.scope, node.lineno, direct[node.id]))

    Finder().visit(tree)
    return found


def stray_json_readers(modules: list[Module], allowed: dict[str, dict[str, str]] = JSON_ALLOWED) -> list[str]:
    problems = []
    for module in modules:
        if module.name == JSON_READER:
            continue
        for scope, line, what in json_parses(module):
            if scope not in allowed.get(module.name, {}):
                problems.append(f"{module.path}:{line}: {module.name}.{scope} calls {what}")
    return problems


def _report(rule: str, problems: list[str]) -> str:
    return f"{rule}: {len(problems)} violation(s)\n  " + "\n  ".join(problems)


# ----------------------------------------------------------------------------------------------
# the rules, on the real package


def test_the_layer_lists_name_real_modules():
    """A typo in a list would make its rule pass vacuously."""
    missing = [name for name in (*FOUNDATION, *HIGHER, *LEAVES, *BELOW_DATA, *STAGES, JSON_READER, *JSON_ALLOWED)
               if name not in MODULE_NAMES]
    assert not missing, f"named in tests/test_layering.py but not a module under src/openllama: {missing}"
    assert not set(FOUNDATION) & set(HIGHER)
    assert len(MODULES) > 30 and sum(len(imports_of(m)) for m in MODULES) > 100  # the walk sees the package


def test_foundation_modules_import_no_higher_layer():
    problems = upward_imports(MODULES)
    assert not problems, _report("foundation modules (config, errors, labels, atomic, artifacts, chat_template, "
                                 "tokenizer, model, data.*) must not import train/serve/evaluate/tasks/pipeline/"
                                 "report/cli/generate/hf/plan", problems)


def test_tokenizer_and_what_it_stands_on_do_not_import_data():
    """data/ imports the tokenizer (tokenising shards), so the tokenizer reading its training text
    through data/ would make the two import each other."""
    problems = [f"{m.path}:{i.line}: {m.name} imports {i.target}" for m in MODULES if m.name in BELOW_DATA
                for i in imports_of(m) if i.target == "openllama.data" or i.target.startswith("openllama.data.")]
    assert not problems, _report("tokenizer, chat_template, records, model, artifacts and config must not import "
                                 "openllama.data", problems)


def test_stage_modules_do_not_import_each_other():
    problems = stage_to_stage_imports(MODULES)
    assert not problems, _report("a training stage (pretrain, sft, reward, dpo, grpo) must not import another",
                                 problems)


def test_no_function_is_longer_than_the_limit():
    problems = long_functions(MODULES)
    assert not problems, _report(f"functions longer than {MAX_FUNCTION_LINES} lines", problems)


def test_json_records_have_one_reader():
    reader = next(m for m in MODULES if m.name == JSON_READER)
    assert json_parses(reader), f"{reader.path} no longer parses JSON: update JSON_READER in this test"
    problems = stray_json_readers(MODULES)
    assert not problems, _report(
        f"JSON is parsed outside {JSON_READER} and the JSON_ALLOWED functions of tests/test_layering.py; read "
        f"records through records.py, or (for one document of a known kind) add the function to "
        f"JSON_ALLOWED with its reason", problems)


def test_json_allow_list_has_no_stale_entries():
    """An entry whose function no longer parses JSON (or was renamed) goes, so the list stays the truth."""
    found = {(m.name, scope) for m in MODULES for scope, _, _ in json_parses(m)}
    stale = [f"{module}: {scope}" for module, scopes in JSON_ALLOWED.items() for scope in scopes
             if (module, scope) not in found]
    assert not stale, f"JSON_ALLOWED in tests/test_layering.py names functions that parse no JSON (remove them): " \
                      f"{stale}"


# ----------------------------------------------------------------------------------------------
# self-checks: each rule flags a synthetic violation (so none can pass vacuously)


def _module(name: str, source: str, is_package: bool = False) -> Module:
    return Module(name, f"<{name}>", source, is_package)


def test_relative_imports_resolve_against_the_package():
    source = ("from ..train import checkpoint\nfrom ..train.engine import train\nfrom .. import errors\n"
              "from . import shards\nimport openllama.serve.app\nfrom openllama import model\n")
    got = [i.target for i in imports_of(_module("openllama.data.x", source))]
    assert got == ["openllama.train.checkpoint", "openllama.train.engine", "openllama.errors", "openllama.data.shards",
                   "openllama.serve.app", "openllama.model"]
    # in a package's __init__, `.` is the package itself
    assert [i.target for i in imports_of(_module("openllama.train", "from .engine import x\n", True))] == \
        ["openllama.train.engine"]
    with pytest.raises(ValueError, match="beyond the top-level package"):
        imports_of(_module("openllama.x", "from ... import y\n"))


def test_self_check_upward_import_is_flagged():
    in_function = "import os\n\ndef f():\n    from .train.checkpoint import save\n    return save\n"
    problems = upward_imports([_module("openllama.config", in_function)])
    assert len(problems) == 1 and "<openllama.config>:4" in problems[0] and "openllama.train.checkpoint" in problems[0]
    assert upward_imports([_module("openllama.data.fake", "from ..serve import app\n")])
    assert upward_imports([_module("openllama.model", "import openllama.hf\n")])
    # a leaf may import errors only
    assert upward_imports([_module("openllama.atomic", "from .config import Section\n")])
    assert not upward_imports([_module("openllama.atomic", "from .errors import UserError\n")])
    # downward and sideways imports are fine
    assert not upward_imports([_module("openllama.data.fake", "from ..model import Llama\nfrom .shards import x\n")])
    assert not upward_imports([_module("openllama.train.fake", "from ..serve import app\n")])  # not foundation


def test_self_check_stage_to_stage_import_is_flagged():
    problems = stage_to_stage_imports([_module("openllama.train.dpo", "def f():\n    from .sft import load_model\n")])
    assert len(problems) == 1 and "<openllama.train.dpo>:2" in problems[0] and "openllama.train.sft" in problems[0]
    assert stage_to_stage_imports([_module("openllama.train.grpo", "from openllama.train.reward import x\n")])
    shared = "from .engine import train\nfrom .objectives import x\nfrom .lora import y\nfrom . import logprobs\n"
    assert not stage_to_stage_imports([_module("openllama.train.dpo", shared)])


def test_self_check_long_function_is_flagged():
    def function(lines: int) -> str:  # a def line plus body lines: `lines` lines in all
        return "def big():\n" + "    x = 1\n" * (lines - 1)

    assert not long_functions([_module("openllama.fake", function(MAX_FUNCTION_LINES))])
    problems = long_functions([_module("openllama.fake", "class C:\n" + textwrap.indent(function(101), "    "))])
    assert problems == ["<openllama.fake>:2: openllama.fake.C.big is 101 lines (limit 100)"]


def test_self_check_stray_json_reader_is_flagged():
    source = ("import json\nimport orjson as oj\nfrom json import loads as parse\n\n"
              "def read(path):\n    return [json.loads(x) for x in open(path)]\n\n"
              "class R:\n    def go(self, b):\n        return oj.loads(b), parse(b), json.JSONDecoder()\n\n"
              "def write(x):\n    return json.dumps(x)\n")
    problems = stray_json_readers([_module("openllama.data.chat", source)])
    assert [p.split(": ", 1)[0] for p in problems] == ["<openllama.data.chat>:6"] + ["<openllama.data.chat>:10"] * 3
    assert "openllama.data.chat.read calls json.loads" in problems[0]
    # the reader itself, and an allowed function, are not flagged
    assert not stray_json_readers([_module(JSON_READER, source)])
    assert len(stray_json_readers([_module("openllama.x", source)], {"openllama.x": {"read": "test"}})) == 3
