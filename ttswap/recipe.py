"""Recipes: per-model data files that set each layer's sharding, dtypes, fidelity and block sizes.

A recipe is TOML::

    [recipe]
    name = "ese_vovnet"
    input_shape = [1, 3, 224, 224]      # optional; convert(input_shape=...) overrides it
    bfp8_guard = 0.03                   # optional; see Recipe.bfp8_guard

    [defaults]                          # any OpConfig field
    weight_dtype = "bfp8_b"
    fidelity = "LoFi"

    [[rules]]                           # applied in order, later rules win
    match = "stages.3.*"                # fnmatch glob over the layer's module path
    op = "conv"                         # optional: only layers made by these rewriters
    shard = "block"
    act_block_h = "default"             # a multiple of 32, or "default": ttnn chooses (undoes a wider rule)
    note = "why this rule"              # optional: shown in the report of the layers it sets

Names registered with ``register_recipe_factory`` (``ttswap.tuning`` registers ``"auto"``, which tunes a
recipe per model through ``Recipe.for_model``) load from their factory; ``Recipe.to_toml`` writes any
recipe, a tuned one included, back as a file.

    [resolutions."640x640"]             # optional: rules that apply only at this input size
    rules = [{ match = "down1.*", act_block_h = 64 }]

Errors name the file, the rule and the field.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

from ttswap.config import DType, Fidelity, OpConfig, ShardLayout, resolve_auto_shard

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_FIELD_TYPES: dict[str, Any] = {
    "shard": ShardLayout,
    "act_dtype": DType,
    "weight_dtype": DType,
    "fidelity": Fidelity,
    "fp32_acc": bool,
    "act_block_h": int,
    "deallocate": bool,
    "packer_l1_acc": bool,
}
DEFAULT_ACT_BLOCK_H = "default"  # how a recipe file spells act_block_h=None: ttnn's own choice
_ENUM_ALIASES = {"bfloat8_b": "bfp8_b", "bfloat16": "bf16", "float32": "fp32", "lofi": "LoFi", "hifi2": "HiFi2",
                 "hifi3": "HiFi3", "hifi4": "HiFi4"}


class RecipeError(ValueError):
    pass


def parse_overrides(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate a table of OpConfig fields into typed values."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        kind = _FIELD_TYPES.get(key)
        if kind is None:
            raise RecipeError(f"{where}: unknown field {key!r}; valid fields: {', '.join(_FIELD_TYPES)}")
        if kind is bool:
            if not isinstance(value, bool):
                raise RecipeError(f"{where}: field {key!r} must be true or false, got {value!r}")
        elif kind is int:
            if value == DEFAULT_ACT_BLOCK_H:
                value = None
            elif value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % 32):
                raise RecipeError(f"{where}: field {key!r} must be a positive multiple of 32 or "
                                  f"{DEFAULT_ACT_BLOCK_H!r}, got {value!r}")
        else:
            text = _ENUM_ALIASES.get(str(value).lower(), value)
            try:
                value = kind(text)
            except ValueError:
                valid = ", ".join(repr(v.value) for v in kind)
                raise RecipeError(f"{where}: field {key!r} has invalid value {value!r}; valid: {valid}") from None
        out[key] = value
    return out


@dataclass(frozen=True)
class Rule:
    match: str
    overrides: dict[str, Any]
    ops: tuple[str, ...] = ()  # rewriter names this rule is limited to; empty means all
    label: str = ""
    note: str = ""  # shown in the report of the layers it applies to (the auto recipe says why here)

    def applies(self, layer: str, op: str) -> bool:
        return fnmatch.fnmatchcase(layer, self.match) and (not self.ops or op in self.ops)


# Rewriter names a rule's ``op`` may use, filled by ``ttswap.patterns.registry.register``. The patterns
# read recipes, so recipes check the names without importing the patterns.
REWRITER_NAMES: set[str] = set()
# Recipes made per model rather than read from a file, by name. ``ttswap.tuning`` registers "auto":
# recipes stay data that knows nothing of tuning, and tuning sits above the converter.
_FACTORIES: dict[str, Callable[[], "Recipe"]] = {}


def register_recipe_factory(name: str, factory: Callable[[], "Recipe"]) -> None:
    """Make ``Recipe.load(name)`` (and ``convert(model, name)``) return ``factory()``."""
    _FACTORIES[name] = factory


@dataclass(frozen=True)
class ResolvedConfig:
    config: OpConfig
    rules: tuple[str, ...]  # labels of the rules that set something, in order
    notes: tuple[str, ...] = ()  # notes of the rules that applied


@dataclass
class Recipe:
    name: str
    defaults: OpConfig = field(default_factory=OpConfig)
    rules: list[Rule] = field(default_factory=list)
    input_shape: tuple[int, int, int, int] | None = None
    resolutions: dict[str, list[Rule]] = field(default_factory=dict)  # "HxW" -> extra rules
    # Largest per-output-channel relative error bfp8_b may put on a layer's folded weights before
    # that layer keeps bf16 weights instead. Catches BatchNorm folds whose scales differ wildly
    # inside one 16-value exponent block. None disables the guard.
    bfp8_guard: float | None = None
    description: str = ""
    source: str = "<python>"

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: "str | Path | Recipe") -> "Recipe":
        if isinstance(name_or_path, Recipe):
            return name_or_path
        if isinstance(name_or_path, str) and name_or_path in _FACTORIES:
            return _FACTORIES[name_or_path]()
        path = Path(name_or_path)
        if path.suffix == ".toml" or path.exists():
            if not path.is_file():
                raise RecipeError(f"recipe file {str(path)!r} does not exist")
            return cls.from_toml(path.read_text(), source=str(path))
        return cls.from_toml(_shipped_recipe_text(str(name_or_path)), source=f"recipes/{name_or_path}.toml")

    @classmethod
    def from_toml(cls, text: str, source: str = "<string>") -> "Recipe":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"{source}: not valid TOML: {exc}") from None
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "Recipe":
        """A recipe from the tables of a recipe file, as plain data (what ``tomllib`` returns)."""
        unknown = set(data) - {"recipe", "defaults", "rules", "resolutions"}
        if unknown:
            raise RecipeError(f"{source}: unknown section(s) {sorted(unknown)}; valid: recipe, defaults, rules, resolutions")
        head = dict(data.get("recipe", {}))
        name = head.pop("name", Path(source).stem)
        description = head.pop("description", "")
        shape = head.pop("input_shape", None)
        guard = head.pop("bfp8_guard", None)
        if head:
            raise RecipeError(f"{source}: [recipe]: unknown field(s) {sorted(head)}; valid: name, description, input_shape, bfp8_guard")
        if shape is not None and (len(shape) != 4 or not all(isinstance(v, int) and v > 0 for v in shape)):
            raise RecipeError(f"{source}: [recipe]: field 'input_shape' must be 4 positive integers [N, C, H, W], got {shape!r}")
        if guard is not None and not (isinstance(guard, (int, float)) and guard > 0):
            raise RecipeError(f"{source}: [recipe]: field 'bfp8_guard' must be a positive number, got {guard!r}")
        overrides = parse_overrides(data.get("defaults", {}), f"{source}: [defaults]")  # its errors say where
        try:
            defaults = OpConfig(**overrides)
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"{source}: [defaults]: {exc}") from None
        rules = _parse_rules(data.get("rules", []), source, "rules")
        resolutions = {}
        for key, table in data.get("resolutions", {}).items():
            if not _is_hw_key(key):
                raise RecipeError(f"{source}: [resolutions.{key!r}]: key must look like \"640x640\" (H x W)")
            extra = set(table) - {"rules"}
            if extra:
                raise RecipeError(f"{source}: [resolutions.{key!r}]: unknown field(s) {sorted(extra)}; valid: rules")
            resolutions[key] = _parse_rules(table.get("rules", []), source, f"resolutions.{key}.rules")
        return cls(name=name, defaults=defaults, rules=rules, input_shape=tuple(shape) if shape else None,
                   resolutions=resolutions, bfp8_guard=float(guard) if guard is not None else None,
                   description=description, source=source)

    # -- use ---------------------------------------------------------------------------------------
    def for_model(self, model: Any, input_shape: tuple[int, ...], backend: Any = None) -> "Recipe":
        """The recipe that converts ``model`` on ``backend``: this one. A subclass made by a registered
        factory (``register_recipe_factory``) may make one for the model instead."""
        return self

    def override(self, match: str = "*", **fields: Any) -> "Recipe":
        """A copy with one more rule at the end (so it wins), e.g. ``override(fidelity="HiFi4")``."""
        rule = Rule(match, parse_overrides(fields, f"{self.source}: override"), label=f"override({match!r})")
        return dataclasses.replace(self, rules=[*self.rules, rule])

    def resolve(self, layer: str, op: str, nhw: int, channels: int, input_hw: tuple[int, int] | None = None) -> ResolvedConfig:
        values = dataclasses.asdict(self.defaults)
        applied: list[str] = []
        notes: list[str] = []
        for rule in self._rules_for(input_hw):
            if rule.applies(layer, op):
                values.update(rule.overrides)
                applied.append(rule.label)
                if rule.note:
                    notes.append(rule.note)
        config = OpConfig(**values)
        if config.shard is ShardLayout.AUTO:
            config = config.replace(shard=resolve_auto_shard(nhw, channels))
        return ResolvedConfig(config, tuple(applied), tuple(notes))

    def _rules_for(self, input_hw: tuple[int, int] | None) -> Iterable[Rule]:
        yield from self.rules
        if input_hw is not None:
            yield from self.resolutions.get(f"{input_hw[0]}x{input_hw[1]}", [])

    def to_tables(self) -> dict[str, Any]:
        """This recipe as the tables of a recipe file, plain data that ``from_dict`` reads back and
        TOML or JSON can hold (no None: ttnn's own act_block_h is spelled ``"default"``)."""
        head: dict[str, Any] = {"name": self.name}
        if self.description:
            head["description"] = self.description
        if self.input_shape:
            head["input_shape"] = list(self.input_shape)
        if self.bfp8_guard is not None:
            head["bfp8_guard"] = self.bfp8_guard
        data: dict[str, Any] = {"recipe": head,
                                "defaults": {k: v for k, v in self.defaults.to_dict().items() if v is not None}}
        if self.rules:
            data["rules"] = [_rule_table(r) for r in self.rules]
        if self.resolutions:
            data["resolutions"] = {hw: {"rules": [_rule_table(r) for r in rules]} for hw, rules in self.resolutions.items()}
        return data

    def to_toml(self) -> str:
        """This recipe as a recipe file: ``Recipe.from_toml(r.to_toml())`` configures every layer as
        ``r`` does. How a tuned ``"auto"`` recipe becomes a file to ship, read and edit."""
        return tomli_w.dumps(self.to_tables())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "bfp8_guard": self.bfp8_guard,
            "defaults": self.defaults.to_dict(),
            "rules": [_rule_dict(r) for r in self.rules],
            "resolutions": {k: [_rule_dict(r) for r in v] for k, v in self.resolutions.items()},
        }


def _rule_dict(rule: Rule) -> dict[str, Any]:
    return {"match": rule.match, "ops": list(rule.ops), **_plain(rule.overrides), **({"note": rule.note} if rule.note else {})}


def _rule_table(rule: Rule) -> dict[str, Any]:
    """A rule as the file format spells it (``from_dict`` reads it back)."""
    table: dict[str, Any] = {"match": rule.match}
    if rule.ops:  # one op as a plain string: tomli_w spreads any array over several lines
        table["op"] = rule.ops[0] if len(rule.ops) == 1 else list(rule.ops)
    for key, value in _plain(rule.overrides).items():
        table[key] = DEFAULT_ACT_BLOCK_H if value is None else value
    if rule.note:
        table["note"] = rule.note
    return table


def _plain(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: getattr(v, "value", v) for k, v in overrides.items()}


def _is_hw_key(key: str) -> bool:
    parts = key.split("x")
    return len(parts) == 2 and all(p.isdigit() for p in parts)


def _parse_rules(raw: Any, source: str, section: str) -> list[Rule]:
    if not isinstance(raw, list):
        raise RecipeError(f"{source}: [{section}] must be an array of tables ([[{section}]])")
    rules = []
    for i, table in enumerate(raw):
        table = dict(table)
        match = table.pop("match", None)
        where = f"{source}: {section}[{i}]" + (f" (match={match!r})" if match else "")
        if not isinstance(match, str) or not match:
            raise RecipeError(f"{where}: field 'match' (a module-path glob) is required")
        ops = table.pop("op", ())
        ops = (ops,) if isinstance(ops, str) else tuple(ops)
        note = table.pop("note", "")
        if not isinstance(note, str):
            raise RecipeError(f"{where}: field 'note' must be a string, got {note!r}")
        unknown_ops = [o for o in ops if o not in REWRITER_NAMES]
        if unknown_ops:
            raise RecipeError(f"{where}: field 'op' names unknown rewriter(s) {unknown_ops}; known: {', '.join(sorted(REWRITER_NAMES))}")
        overrides = parse_overrides(table, where)
        try:
            OpConfig(**overrides)
        except ValueError as exc:
            raise RecipeError(f"{where}: {exc}") from None
        rules.append(Rule(match, overrides, ops, label=f"{section}[{i}] {match!r}", note=note))
    return rules


def shipped_recipes() -> list[str]:
    names = {p.name[:-5] for p in _recipe_dir().iterdir() if p.name.endswith(".toml")}
    return sorted(names)


def _recipe_dir():
    try:
        return resources.files("ttswap.recipes")
    except ModuleNotFoundError:  # running from a source tree that was never installed
        return Path(__file__).resolve().parent.parent / "recipes"


def _shipped_recipe_text(name: str) -> str:
    entry = _recipe_dir() / f"{name}.toml"
    if not entry.is_file():
        raise RecipeError(f"no shipped recipe named {name!r} and no such file; shipped: {', '.join(shipped_recipes())}")
    return entry.read_text()
