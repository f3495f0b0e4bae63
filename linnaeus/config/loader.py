"""YAML loading with ``BASE`` inheritance, ``--opts`` overrides, aliases, provenance and one-line errors.

Every leaf value remembers where it came from (a file or ``--opts``), so an error can say
"DATA.IMG_SIZE (from configs/experiments/x.yaml): ...".
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from linnaeus.config.defaults import Config
from linnaeus.errors import ConfigError

OPTS = "--opts"
DEFAULTS = "defaults"


def repo_root() -> Path:
    """The directory holding ``configs/``: the source checkout, or the current directory for an installed package."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "configs").is_dir() else Path.cwd()


class Provenance(dict):
    """Maps a dotted key (``DATA.IMG_SIZE``) to the file or ``--opts`` that set it last."""

    def origin(self, dotted: str) -> str:
        parts = dotted.split(".")
        while parts:
            key = ".".join(parts)
            if key in self:
                return self[key]
            parts.pop()
        return DEFAULTS


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level, got {type(data).__name__}")
    return data


def _resolve_base(entry: str, including: Path) -> Path:
    candidate = Path(os.path.expanduser(entry))
    if candidate.is_absolute():
        return candidate
    for root in (including.parent, repo_root(), Path.cwd()):
        if (root / candidate).is_file():
            return (root / candidate).resolve()
    raise ConfigError(
        f"BASE (from {including}): '{entry}' not found relative to {including.parent}, {repo_root()} or {Path.cwd()}"
    )


def _merge(dst: dict, src: dict, origin: str, prov: Provenance, prefix: tuple[str, ...] = ()) -> None:
    for key, value in src.items():
        key = str(key)
        path = (*prefix, key)
        dotted = ".".join(path)
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origin, prov, path)
        else:
            dst[key] = _copy(value)
            prov[dotted] = origin
            _mark_children(value, dotted, origin, prov)


def _mark_children(value: Any, dotted: str, origin: str, prov: Provenance) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            prov[f"{dotted}.{k}"] = origin
            _mark_children(v, f"{dotted}.{k}", origin, prov)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _load_tree(path: Path, prov: Provenance, stack: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"BASE (from {stack[-1]}): inheritance cycle {chain}")
    raw = _read_yaml(path)
    bases = raw.pop("BASE", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"BASE (from {path}): expected a list of YAML paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        # The recursive call records each inherited key's own file in `prov`; merging its result must not
        # overwrite that with this file's name, hence the throwaway provenance here.
        _merge(merged, _load_tree(_resolve_base(base, path), prov, (*stack, path)), str(path), Provenance())
    _merge(merged, raw, _display(path), prov)
    return merged


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def parse_opts(opts: list[str]) -> list[tuple[str, Any]]:
    if len(opts) % 2:
        raise ConfigError(f"--opts: expected KEY VALUE pairs, got an odd number of items ({len(opts)}): {opts!r}")
    pairs = []
    for key, text in zip(opts[::2], opts[1::2], strict=True):
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        pairs.append((key, value))
    return pairs


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def _get_dotted(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _apply_aliases(tree: dict, prov: Provenance) -> None:
    """``TRAIN.BATCH_SIZE`` is the prior system's user-guide name for the per-process batch size ``DATA.BATCH_SIZE``."""
    alias = _get_dotted(tree, "TRAIN.BATCH_SIZE")
    if alias is not None:
        _set_dotted(tree, "DATA.BATCH_SIZE", alias)
        prov["DATA.BATCH_SIZE"] = prov.origin("TRAIN.BATCH_SIZE")


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at ``loc`` (for suggesting the nearest valid key)."""
    model: Any = Config
    i = 0
    while i < len(loc) - 1:
        part = loc[i]
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        nested = _nested_model(ann)
        if nested is not None:
            model = nested
            i += 1
            continue
        value_model = _dict_value_model(ann)
        if value_model is not None:
            model = value_model
            i += 2  # skip the user-chosen key
            continue
        return None
    return model


def _nested_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return None


def _dict_value_model(ann: Any) -> type[BaseModel] | None:
    args = getattr(ann, "__args__", ())
    if getattr(ann, "__origin__", None) is dict and len(args) == 2:
        return _nested_model(args[1])
    return None


def _format_error(err: dict[str, Any], prov: Provenance) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    dotted = ".".join(str(p) for p in loc) or "<root>"
    origin = prov.origin(dotted)
    kind = err["type"]
    if kind == "extra_forbidden":
        holder = _model_at(loc)
        hint = ""
        if holder is not None:
            close = difflib.get_close_matches(str(loc[-1]), _field_names(holder), n=1, cutoff=0.5)
            if not close:
                close = difflib.get_close_matches(str(loc[-1]).upper(), _field_names(holder), n=1, cutoff=0.5)
            if close:
                parent = ".".join(str(p) for p in loc[:-1])
                hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?"
        return f"{dotted} (from {origin}): unknown key{hint}"
    if kind == "missing":
        return f"{dotted} (from {origin}): required key is missing"
    given = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    return f"{dotted} (from {origin}): {msg}, got {given!r}"


def build_config(tree: dict[str, Any], prov: Provenance) -> Config:
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(_format_error(errors[0], prov) + more) from None
    from linnaeus.config.checks import check_consistency

    check_consistency(cfg, prov)
    return cfg


def load_config(cfg_path: str | os.PathLike | None, opts: list[str] | None = None) -> Config:
    """Read an experiment YAML (with its BASE chain), apply ``--opts``, validate, return the typed config."""
    cfg, _ = load_config_with_provenance(cfg_path, opts)
    return cfg


def load_config_with_provenance(
    cfg_path: str | os.PathLike | None, opts: list[str] | None = None
) -> tuple[Config, Provenance]:
    prov = Provenance()
    tree: dict[str, Any] = {}
    if cfg_path is not None:
        tree = _load_tree(Path(cfg_path), prov, ())
    for key, value in parse_opts(list(opts or [])):
        if key == "BASE":
            raise ConfigError("BASE (from --opts): inheritance can only be set in YAML files")
        _set_dotted(tree, key, value)
        prov[key] = OPTS
        _mark_children(value, key, OPTS, prov)
    _apply_aliases(tree, prov)
    return build_config(tree, prov), prov


def config_to_dict(cfg: Config) -> dict[str, Any]:
    data = cfg.model_dump(mode="json")
    data.pop("BASE", None)
    return data


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML; ``load_config`` of this text gives an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    from linnaeus.utils.io import atomic_write_text

    atomic_write_text(Path(path), dump_config(cfg))
