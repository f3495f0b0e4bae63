"""``linnaeus config {render,validate,explain,migrate}``: look at a configuration the way the trainer sees it.

- ``render``: the resolved config, every value followed by the file (or ``--opts``/defaults) it came from.
- ``validate``: every problem at once (not only the first), plus the compatibility warnings; ``--json`` too.
- ``explain KEY``: what a key means, its type and default, and (with ``--cfg``) its value and where it was set;
  keys of Polli Linnaeus configs say what they became.
- ``migrate FILE``: an equivalent file in our keys (BASE files inlined), one comment per change; it loads with
  no warnings and resolves to the same config.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path
from typing import Any

import yaml

from linnaeus.config import compat
from linnaeus.config.defaults import Config
from linnaeus.config.launch_facts import from_accelerate_config
from linnaeus.config.loader import (
    DEFAULTS,
    Provenance,
    build_config,
    config_to_dict,
    field_at,
    nearest_key,
    problems_of,
    resolve_tree,
    schema_kind,
)
from linnaeus.errors import ConfigError
from linnaeus.utils.io import atomic_write_text


def run(args: argparse.Namespace) -> int:
    return {"render": render, "validate": validate, "explain": explain, "migrate": migrate}[args.config_command](args)


# ---------------------------------------------------------------------------------------------------- render
def _leaves(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) per schema leaf; open-map values (LOSS.PARAMS) stay whole."""
    out = []
    for k, v in data.items():
        dotted = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v and schema_kind(dotted) == "node":
            out += _leaves(v, dotted)
        else:
            out.append((dotted, v))
    return out


def render_text(cfg: Config, prov: Provenance) -> str:
    """YAML of the resolved config with ``# from <source>`` after every value (it loads back unchanged)."""
    lines = []
    for bases in [prov.bases] if prov.bases else []:
        lines += [f"# BASE resolved to: {b}" for b in bases]
    _render(config_to_dict(cfg), "", 0, prov, lines)
    return "\n".join(lines) + "\n"


def _render(data: dict[str, Any], prefix: str, depth: int, prov: Provenance, lines: list[str]) -> None:
    pad = "  " * depth
    for k, v in data.items():
        dotted = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v and schema_kind(dotted) == "node":
            lines.append(f"{pad}{k}:")
            _render(v, dotted, depth + 1, prov, lines)
        else:
            lines.append(f"{pad}{k}: {json.dumps(v)}  # from {prov.origin(dotted)}")


def render(args: argparse.Namespace) -> int:
    tree, prov, problems = resolve_tree(args.cfg, args.opts)
    cfg = build_config(tree, prov, problems)
    if args.json:
        data = {k: {"value": v, "source": prov.origin(k)} for k, v in _leaves(config_to_dict(cfg))}
        print(json.dumps(data, indent=2))
    else:
        print(render_text(cfg, prov), end="")
    for line in prov.warnings:
        print(f"warning: {line}", file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------------------------- validate
def validation_report(
    cfg_path: str | None, opts: list[str], accelerate_config: str | None = None, verbose: bool = True
) -> dict[str, Any]:
    """{ok, errors, warnings}: every config problem, each one line (also used by `linnaeus check --json`); with an
    accelerate config, also what that launch makes impossible (ZeRO-3 with GradNorm, ...). The compatibility
    findings come one line each (``verbose``) or as one summary line."""
    warnings: list[str] = []
    try:
        launch = from_accelerate_config(accelerate_config) if accelerate_config else None
        tree, prov, problems = resolve_tree(cfg_path, opts)
        summary = compat.summary_line(prov.findings)
        warnings = list(prov.warnings) if verbose or summary is None else [summary]
        build_config(tree, prov, problems, launch)
        errors: list[str] = []
    except ConfigError as err:
        errors = problems_of(err)
    return {"ok": not errors, "errors": errors, "warnings": warnings}


def validate(args: argparse.Namespace) -> int:
    report = validation_report(args.cfg, args.opts, args.accelerate_config, verbose=args.verbose or args.json)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for line in report["warnings"]:
            print(f"warning: {line}")
        n = len(report["errors"])
        print("config: OK" if report["ok"] else f"config: {n} problem{'s' if n > 1 else ''} (listed on stderr)")
        sys.stdout.flush()
        for line in report["errors"]:
            print(f"error: {line}", file=sys.stderr)
    return 0 if report["ok"] else ConfigError.exit_code


# --------------------------------------------------------------------------------------------------- explain
def explain_lines(key: str, cfg_path: str | None = None, opts: list[str] | None = None) -> list[str]:
    found = field_at(key)
    lines: list[str] = []
    if found is None:
        rule = compat.lookup(key)
        if rule is not None:
            return [f"{key}: a Polli Linnaeus key; {_rule_text(rule[0], rule[1])}"]
        if schema_kind(key) == "node":
            return [f"{key}: a section; keys: `linnaeus config render --cfg FILE` shows them with their values"]
        hint = nearest_key(key)
        raise ConfigError(f"{key}: unknown key" + (f"; did you mean {hint}?" if hint else ""))
    model, name = found
    info = model.model_fields[name]
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    if hasattr(default, "model_dump"):
        default = default.model_dump(mode="json")
    lines.append(f"{key}: {info.description or '(see docs: linnaeus/config/defaults.py)'}")
    lines.append(f"  type: {_type_name(info.annotation)}")
    lines.append(f"  default: {'none (required)' if info.is_required() else json.dumps(default)}")
    lines.append(f"  allowed: {allowed_values(info)}")
    if cfg_path is not None or opts:
        tree, prov, problems = resolve_tree(cfg_path, opts)
        cfg = build_config(tree, prov, problems)
        value: Any = config_to_dict(cfg)
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        origin = prov.origin(key)
        lines.append(
            f"  value: {json.dumps(value)}  (set in {origin})"
            if origin != DEFAULTS
            else f"  value: {json.dumps(value)}  (default)"
        )
    return lines


def allowed_values(info: Any) -> str:
    """What a field accepts, from the schema itself: Literal choices, registered names, numeric bounds, null."""
    import typing

    import annotated_types as at

    from linnaeus import registry

    annotation = info.annotation
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    options = [a for a in args if a is not type(None)] or [annotation]
    nullable = type(None) in args
    parts: list[str] = []
    for option in options:
        if typing.get_origin(option) is typing.Literal:
            parts.append(", ".join(json.dumps(v) for v in typing.get_args(option)))
        elif option is bool:
            parts.append("true, false")
    from linnaeus.config import defaults

    named = {
        id(typing.get_args(alias)[1]): reg
        for alias, reg in (
            (defaults.ModelName, registry.MODELS),
            (defaults.HeadName, registry.HEADS),
            (defaults.LossName, registry.LOSSES),
        )
    }
    bounds = []
    for meta in info.metadata:
        if id(meta) in named:
            reg = named[id(meta)]
            parts.append(f"a registered {reg.kind}: {', '.join(reg.names())}")
        for cls, attr, sign in (
            (at.Ge, "ge", ">="),
            (at.Gt, "gt", ">"),
            (at.Le, "le", "<="),
            (at.Lt, "lt", "<"),
            (at.MinLen, "min_length", "length >="),
        ):
            if isinstance(meta, cls):
                bounds.append(f"{sign} {getattr(meta, attr)}")
    if bounds:
        parts.append(" and ".join(bounds))
    if not parts:
        parts.append(f"any {_type_name(options[0] if len(options) == 1 else annotation)}")
    return "; ".join(parts) + (" (or null)" if nullable else "")


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def _rule_text(rule: compat.Rule, groups: tuple[str, ...]) -> str:
    if isinstance(rule, compat.Map):
        return f"read as {rule.target.format(*groups)}" + (f" ({rule.note})" if rule.note else "")
    if isinstance(rule, compat.PerTask):
        return f"a per-task list ({rule.what}) written onto MODEL.CLASSIFICATION.HEADS.<task> / LOSS"
    if isinstance(rule, compat.Fixed):
        return f"fixed here: {rule.reason} (the prior value is accepted with a warning)"
    return f"ignored with a warning: {rule.reason}"


def explain(args: argparse.Namespace) -> int:
    for line in explain_lines(args.key, args.cfg, args.opts):
        print(line)
    return 0


# --------------------------------------------------------------------------------------------------- migrate
def migrated_text(path: Path) -> str:
    """An equivalent YAML in our keys: every key the file (and its BASE chain) set, BASE inlined, comments."""
    tree, prov, problems = resolve_tree(path)
    cfg = build_config(tree, prov, problems)
    resolved = config_to_dict(cfg)
    resolved.pop("BASE_RESOLVED", None)
    out: dict[str, Any] = {}
    for dotted in prov:
        if any(k.startswith(dotted + ".") for k in prov):
            continue  # e.g. an arch file's `HEADS: {}` that later files filled in
        value: Any = resolved
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            _put(out, dotted, value)
    header = [f"# Migrated from {path} by `linnaeus config migrate`."]
    header += [f"# BASE inlined: {b}" for b in prov.bases]
    header += [f"# {f.line().replace('; ' + compat.MIGRATE_HINT, '')}" for f in prov.findings]
    body = yaml.safe_dump(_ordered(out, resolved), sort_keys=False, default_flow_style=None, width=120)
    return "\n".join(header) + "\n" + body


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    if isinstance(node.get(parts[-1]), dict) and isinstance(value, dict):
        node[parts[-1]].update(value)
    else:
        node[parts[-1]] = value


def _ordered(out: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """``out`` with keys in the resolved config's order (sections read in the usual order)."""
    ordered = {}
    for k in reference:
        if k in out:
            v = out[k]
            ordered[k] = _ordered(v, reference[k]) if isinstance(v, dict) and isinstance(reference[k], dict) else v
    return ordered


def migrate(args: argparse.Namespace) -> int:
    src = Path(args.file)
    out = Path(args.out) if args.out else src.with_name(src.stem + ".migrated.yaml")
    if out.resolve() == src.resolve():
        raise ConfigError(f"--out {out}: would overwrite the file being migrated; choose another path")
    atomic_write_text(out, migrated_text(src))
    print(f"wrote {out}")
    return 0
