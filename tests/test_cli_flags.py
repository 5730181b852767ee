"""Every command's flags come from its config dataclass, and every field of that config is read.

The first test holds the parser to the configs: a flag declared by hand beside `add_config_flags` has no
field behind it and fails it. The second is static: from the command's handler it follows, by name, every
function and class of parti it calls or refers to (`f(...)`, `module.f`, `Class(...)` with its methods), and
collects their attribute reads (`x.name`); each config field must be among them. Settings classes
themselves are left out, so a field read only by its own validation is still "never read". Nothing runs:
no torch work, no network, well under a second of parsing.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types

import pytest

from parti import cli
from parti.settings import base_type, field_types


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Subcommand name -> its parser (an alias shares its command's parser and is listed once)."""
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    seen: dict[int, str] = {}
    for name, parser in sub.choices.items():
        seen.setdefault(id(parser), name)
    return {name: sub.choices[name] for name in seen.values()}


COMMANDS = _commands()


def _fields(cls: type) -> dict[str, type]:
    """The config's fields as the command line has them (nested dataclasses flattened) -> the declaring class."""
    out: dict[str, type] = {}
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        kind, _ = base_type(hints[f.name])
        if dataclasses.is_dataclass(kind):
            nested = _fields(kind)
            assert not set(nested) & set(out), f"{cls.__name__}: {set(nested) & set(out)} declared twice"
            out.update(nested)
        else:
            assert f.name not in out, f"{cls.__name__}.{f.name} declared twice"
            out[f.name] = cls
    return out


def _config(name: str) -> type:
    config = COMMANDS[name].get_default("config_class")
    assert dataclasses.is_dataclass(config), f"`parti {name}` has no config dataclass (set_defaults(config_class=))"
    return config


def test_every_command_is_built_from_a_config():
    assert {"train-tokenizer", "train-generator", "encode", "sample", "demo", "evaluate-tokenizer", "evaluate",
            "plot", "push", "serve"} <= set(COMMANDS)
    for name in COMMANDS:
        assert callable(COMMANDS[name].get_default("handler")), name
        _config(name)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_is_a_config_field(name):
    parser, fields = COMMANDS[name], _fields(_config(name))
    dests = {a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction)}
    assert dests - set(fields) == set(), f"`parti {name}`: flags with no config field (declared by hand?)"
    assert set(fields) - dests == set(), f"`parti {name}`: config fields with no flag"
    assert not {"command", "quiet", "handler", "config_class", "func"} & set(fields), "a field shadows the CLI's own names"


# ---- every field is read --------------------------------------------------------------------------------

def _is_settings_class(obj) -> bool:
    """A dataclass whose fields are declared with `setting(...)` (or nest one): its body declares, not reads."""
    return isinstance(obj, type) and dataclasses.is_dataclass(obj)


def _resolve(node: ast.AST, namespace: dict):
    """The object a Name or a dotted `module.name` refers to in `namespace`, else None."""
    if isinstance(node, ast.Name):
        return namespace.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value, namespace)
        if isinstance(owner, types.ModuleType):
            return getattr(owner, node.attr, None)
    return None


def _ours(obj) -> bool:
    module = getattr(inspect.unwrap(obj), "__module__", None) if callable(obj) else None
    return bool(module) and (module == "parti" or module.startswith("parti.")) and not _is_settings_class(obj)


def attributes_read(handler) -> set[str]:
    """Attribute names read (`x.name`) in `handler` and every parti function or class it reaches by name."""
    reads: set[str] = set()
    todo, seen = [handler], set()
    while todo:
        obj = inspect.unwrap(todo.pop())
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        namespace = vars(inspect.getmodule(obj))
        tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                reads.add(node.attr)
            if isinstance(node, (ast.Name, ast.Attribute)):
                target = _resolve(node, namespace)
                if target is not None and (inspect.isfunction(target) or isinstance(target, type)) and _ours(target):
                    todo.append(target)
    return reads


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_config_field_is_read(name):
    handler, fields = COMMANDS[name].get_default("handler"), _fields(_config(name))
    reads = attributes_read(handler)
    unread = sorted(f"{owner.__name__}.{field}" for field, owner in fields.items() if field not in reads)
    assert unread == [], f"`parti {name}`: config fields no code reads: {unread}"


def test_the_reader_check_sees_an_unread_field():
    """The static check is not vacuous: a field no code reads is reported."""

    @dataclasses.dataclass
    class Probe:
        used: int = 0
        never_read_anywhere: int = 0

    def handler(cfg: Probe) -> None:
        print(cfg.used)

    reads = attributes_read(handler)
    assert "used" in reads and "never_read_anywhere" not in reads


def test_a_cond_drop_prob_of_1_is_refused_before_any_work(tmp_path, capsys):
    """The model's bound (GeneratorConfig.BOUNDS: [0, 1)) is the flag's: refused at parse time, not after the
    dataset has been encoded."""
    from parti.cli import main

    out = tmp_path / "gen"
    assert main(["train-generator", "--cond-drop-prob", "1", "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cond_drop_prob (--cond-drop-prob)" in err and "< 1.0" in err
    assert not out.exists()
