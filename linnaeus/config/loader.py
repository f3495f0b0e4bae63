"""YAML loading with ``BASE`` inheritance, ``--opts`` overrides, aliases, provenance and one-line errors.

Every leaf value remembers where it came from (a file or ``--opts``), so an error can say
"DATA.IMG_SIZE (from configs/experiments/x.yaml): ...".
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from linnaeus.checkout import repo_root
from linnaeus.config import compat
from linnaeus.config.defaults import Config, default_components
from linnaeus.config.dotted import get_dotted, set_dotted
from linnaeus.config.yaml_io import read_yaml_file, read_yaml_text, short
from linnaeus.errors import ConfigError

if TYPE_CHECKING:
    from linnaeus.config.launch_facts import LaunchFacts

log = logging.getLogger("linnaeus.config")

OPTS = "--opts"
DEFAULTS = "defaults"


class Provenance(dict):
    """Maps a dotted key (``DATA.IMG_SIZE``) to the file or ``--opts`` that set it last.

    Also carries what loading found: ``warnings`` (one line per compat key), ``findings`` and ``bases`` (the
    resolved BASE files in merge order).
    """

    warnings: list[str]
    findings: list[compat.Finding]
    bases: list[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warnings, self.findings, self.bases = [], [], []

    def origin(self, dotted: str) -> str:
        parts = dotted.split(".")
        while parts:
            key = ".".join(parts)
            if key in self:
                return self[key]
            parts.pop()
        # An unknown section (e.g. `train` for TRAIN) was set only through keys below it.
        below = [v for k, v in self.items() if k.startswith(dotted + ".")]
        return below[-1] if below else DEFAULTS


def _resolve_base(entry: str, including: Path) -> Path:
    """The including file's folder first, then the working directory, then the folders above the including file
    (a user's checkout), then $CONFIG_DIR (Polli Linnaeus' MODEL.BASE root), and this repository last."""
    candidate = Path(os.path.expanduser(entry))
    if candidate.is_absolute():
        if not candidate.is_file():
            raise ConfigError(f"BASE (from {_display(including)}): '{entry}' does not exist")
        return candidate.resolve()
    roots = [including.parent, Path.cwd(), *including.parent.parents]
    if os.environ.get("CONFIG_DIR"):
        roots.append(Path(os.environ["CONFIG_DIR"]))
    roots.append(repo_root())
    for root in roots:
        if (root / candidate).is_file():
            return (root / candidate).resolve()
    raise ConfigError(
        f"BASE (from {_display(including)}): '{entry}' not found relative to {including.parent}, the working"
        f" directory {Path.cwd()}, the folders above {including.parent} or {repo_root()}"
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
            _mark_children(value, dotted, origin, prov)


def _mark_children(value: Any, dotted: str, origin: str, prov: Provenance) -> None:
    """Record ``origin`` for every leaf of ``value`` (not for the sections above them: a file that sets one key
    of MODEL must not be named as the source of MODEL's defaults)."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _mark_children(v, f"{dotted}.{k}", origin, prov)
    else:
        prov[dotted] = origin


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


@dataclass
class LoadState:
    """What loading collects besides the tree: compat warnings and errors, held per-task lists, BASE files."""

    findings: list[compat.Finding] = field(default_factory=list)
    held: list[compat.Held] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    bases: list[str] = field(default_factory=list)
    # Each file's merged tree, read once: a BASE listed many times (10 times a level, 8 levels: 10^8 reads) is
    # merged again from here instead of being read and expanded again.
    trees: dict[Path, dict[str, Any]] = field(default_factory=dict)


def _base_entries(raw: dict[str, Any], path: Path, state: LoadState) -> list[str]:
    """BASE entries in merge order; Polli Linnaeus' MODEL.BASE (its only working inheritance) comes after BASE."""
    where = _display(path)
    bases = _base_list(raw.pop("BASE", []), "BASE", where)
    if "" in bases:
        state.findings.append(compat.Finding("BASE", where, "empty entry '' ignored (the Polli Linnaeus default)"))
    model = raw.get("MODEL")
    if isinstance(model, dict) and "BASE" in model:
        model_bases = _base_list(model.pop("BASE"), "MODEL.BASE", where)
        if any(model_bases):
            message = f"read as BASE (inherited before this file); {compat.MIGRATE_HINT}"
        else:
            message = "empty; nothing inherited (the Polli Linnaeus default)"
        state.findings.append(compat.Finding("MODEL.BASE", where, message))
        bases += model_bases
    return [b for b in bases if b]


def _base_list(value: Any, key: str, where: str) -> list[str]:
    value = [value] if isinstance(value, str) else value
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(b, str) for b in value):
        raise ConfigError(f"{key} (from {where}): expected a list of YAML paths, got {short(value)}")
    return list(value)


def _load_tree(path: Path, prov: Provenance, stack: tuple[Path, ...], state: LoadState) -> dict[str, Any]:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"BASE (from {stack[-1]}): inheritance cycle {chain}")
    if path in state.trees:
        return _copy(state.trees[path])
    raw = read_yaml_file(path)
    merged: dict[str, Any] = {}
    for base in _base_entries(raw, path, state):
        resolved = _resolve_base(base, path)
        log.info("BASE %s (from %s) -> %s", base, _display(path), resolved)
        sub = _load_tree(resolved, prov, (*stack, path), state)
        if str(resolved) not in state.bases:
            state.bases.append(str(resolved))
        # The recursive call records each inherited key's own file in `prov`; merging its result must not
        # overwrite that with this file's name, hence the throwaway provenance here.
        _merge(merged, sub, str(path), Provenance())
    translated = _translate(raw, _display(path), state)
    _merge(merged, translated, _display(path), prov)
    state.trees[path] = _copy(merged)
    return merged


def _translate(raw: dict[str, Any], origin: str, state: LoadState) -> dict[str, Any]:
    result = compat.translate(raw, origin, schema_kind)
    state.findings += result.findings
    state.held += result.held
    state.errors += result.errors
    return result.tree


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def parse_opts(opts: list[str]) -> list[tuple[str, Any]]:
    if len(opts) % 2:
        raise ConfigError(f"--opts: expected KEY VALUE pairs, got an odd number of items ({len(opts)}): {short(opts)}")
    pairs = []
    for key, text in zip(opts[::2], opts[1::2], strict=True):
        try:
            value = read_yaml_text(text, f"--opts {key}") if text != "" else ""
        except ConfigError as err:
            if "not valid YAML" not in str(err):
                raise
            value = text
        pairs.append((key, value))
    return pairs


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    set_dotted(tree, dotted, value)
    return tree


def _pop_dotted(tree: dict, dotted: str) -> tuple[bool, Any]:
    parts = dotted.split(".")
    node: Any = tree
    trail = []
    for part in parts[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(part), dict):
            return False, None
        trail.append((node, part))
        node = node[part]
    if parts[-1] not in node:
        return False, None
    value = node.pop(parts[-1])
    for parent, part in reversed(trail):
        if not parent[part]:
            del parent[part]
    return True, value


def _complete_components(tree: dict, prov: Provenance) -> None:
    """A partial spec of a default component (TEMPORAL, SPATIAL, ELEVATION) gets that component's defaults; a
    component a file or --opts names is enabled unless one of them sets its ENABLED (off is explicit)."""
    comps = get_dotted(tree, "DATA.META.COMPONENTS")
    if not isinstance(comps, dict):
        return
    defaults = default_components()
    for name, spec in comps.items():
        if not isinstance(spec, dict):
            continue
        if name in defaults:
            for k, v in defaults[name].model_dump().items():
                spec.setdefault(k, v)
        prefix = f"DATA.META.COMPONENTS.{name}"
        if f"{prefix}.ENABLED" not in prov and any(k.startswith(prefix + ".") for k in prov):
            spec["ENABLED"] = True


def _apply_aliases(tree: dict, prov: Provenance) -> None:
    """``TRAIN.BATCH_SIZE`` is the prior system's user-guide name for the per-process batch size ``DATA.BATCH_SIZE``."""
    alias = get_dotted(tree, "TRAIN.BATCH_SIZE")
    if alias is not None:
        set_dotted(tree, "DATA.BATCH_SIZE", alias)
        prov["DATA.BATCH_SIZE"] = prov.origin("TRAIN.BATCH_SIZE")


def schema_kind(dotted: str) -> str | None:
    """'node' for a section (or an open map / one of its entries), 'leaf' for a value key, None if unknown."""
    model: Any = Config
    parts = dotted.split(".")
    i = 0
    while i < len(parts):
        fld = model.model_fields.get(parts[i])
        if fld is None:
            return None
        last = i == len(parts) - 1
        nested = _nested_model(fld.annotation)
        if nested is not None:
            if last:
                return "node"
            model, i = nested, i + 1
            continue
        value_model = _dict_value_model(fld.annotation)
        if value_model is not None:
            if last or i + 1 == len(parts) - 1:
                return "node"
            model, i = value_model, i + 2
            continue
        return "leaf" if last else None
    return "node"


def field_at(dotted: str) -> tuple[type[BaseModel], str] | None:
    """The model class holding ``dotted`` and the field's name (open-map names are skipped), or None."""
    parts = dotted.split(".")
    if schema_kind(dotted) is None:
        return None
    holder = _model_at(tuple(parts))
    if holder is None or parts[-1] not in holder.model_fields:
        return None
    return holder, parts[-1]


def nearest_key(dotted: str) -> str | None:
    """The closest valid key to a mistyped one (for did-you-mean hints)."""
    parts = dotted.split(".")
    holder = _model_at(tuple(parts))
    if holder is None:
        return None
    close = difflib.get_close_matches(parts[-1].upper(), _field_names(holder), n=1, cutoff=0.5)
    return ".".join([*parts[:-1], close[0]]) if close else None


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
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "finite_number":
        msg = "expected a finite number"
    return f"{dotted} (from {origin}): {msg}, got {short(err.get('input'))}"


def build_config(
    tree: dict[str, Any], prov: Provenance, problems: list[str] | None = None, launch: LaunchFacts | None = None
) -> Config:
    """Validate ``tree``; every problem (schema, then cross-key, with ``launch`` the launch rules too) is raised at
    once (``err.problems``)."""
    from linnaeus.config.resolve import cross_key_problems, raise_problems

    problems = list(problems or [])
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        raise_problems(problems + [_format_error(e, prov) for e in exc.errors()])
        raise  # unreachable: the list above is never empty
    raise_problems(problems + cross_key_problems(cfg, prov, launch))
    return cfg


def problems_of(err: ConfigError) -> list[str]:
    """Every problem a ConfigError carries (one line each)."""
    return list(getattr(err, "problems", None) or [str(err)])


def load_config(cfg_path: str | os.PathLike | None, opts: list[str] | None = None) -> Config:
    """Read an experiment YAML (with its BASE chain), apply ``--opts``, validate, return the typed config."""
    cfg, _ = load_config_with_provenance(cfg_path, opts)
    return cfg


def resolve_tree(cfg_path: str | os.PathLike | None, opts: list[str] | None = None) -> tuple[dict, Provenance, list]:
    """The merged, translated tree before validation, its provenance, and the compat errors found on the way."""
    prov = Provenance()
    state = LoadState()
    # Metadata components merge key by key like every other section: start from the defaults, so a file that
    # sets only TEMPORAL keeps SPATIAL, and a partial spec is completed from its component's defaults.
    tree: dict[str, Any] = {
        "DATA": {"META": {"COMPONENTS": {n: c.model_dump() for n, c in default_components().items()}}}
    }
    if cfg_path is not None:
        _merge(tree, _load_tree(Path(cfg_path), prov, (), state), "", Provenance())
    for key, value in parse_opts(list(opts or [])):
        if key == "BASE" or (key.endswith(".BASE") and key.split(".")[0] == "MODEL"):
            raise ConfigError(f"{key} (from --opts): inheritance can only be set in YAML files")
        translated = _translate(_nest(key, value), OPTS, state)
        found, here = _pop_dotted(translated, key)
        if found:  # --opts KEY VALUE replaces KEY's value (a mapping too), like yacs' merge_from_list
            set_dotted(tree, key, here)
            _mark_children(here, key, OPTS, prov)
        _merge(tree, translated, OPTS, prov)  # what compat renamed lands under our keys
    _complete_components(tree, prov)
    findings, errors, origins = compat.expand_per_task(tree, state.held, lambda k: k in prov)
    prov.update(origins)
    _apply_aliases(tree, prov)
    if state.bases:
        tree["BASE_RESOLVED"] = state.bases
    prov.warnings = [f.line() for f in (*state.findings, *findings)]
    prov.findings = [*state.findings, *findings]
    prov.bases = list(state.bases)
    return tree, prov, state.errors + errors


def load_config_with_provenance(
    cfg_path: str | os.PathLike | None, opts: list[str] | None = None
) -> tuple[Config, Provenance]:
    tree, prov, problems = resolve_tree(cfg_path, opts)
    cfg = build_config(tree, prov, problems)
    summary = compat.summary_line(prov.findings)
    if summary is not None and os.environ.get("RANK", "0") == "0":  # under a launcher, from the main process only
        log.warning("%s", summary)  # one line; `config validate --verbose` lists every key
    return cfg, prov


def config_to_dict(cfg: Config) -> dict[str, Any]:
    data = cfg.model_dump(mode="json")
    data.pop("BASE", None)
    if not data.get("BASE_RESOLVED"):
        data.pop("BASE_RESOLVED", None)
    return data


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML; ``load_config`` of this text gives an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    from linnaeus.utils.io import atomic_write_text

    atomic_write_text(Path(path), dump_config(cfg))
