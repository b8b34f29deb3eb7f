"""The command line of every script: a schema of nested dataclasses as YAML keys and flags, type checks, every
error at once with "did you mean", and the YAML dump. Generic: it names no setting; CONFIG.py holds the schema and passes it in (`root`,
the top dataclass, and the sections a script uses).
"""
import argparse
import contextlib
import dataclasses
import typing
from dataclasses import field
from typing import Literal, Optional

import yaml

from REPORT import UserError, first_line, suggest


def opt(default, help, *, flag=None, min=None, above=None, at_most=None, const=None):
    """A schema field: its default, help text, optional flag name, range limits, and the value of the bare
    flag (`const`: `--resume` alone means `--resume auto`)."""
    meta = dict(help=help, flag=flag, min=min, above=above, at_most=at_most, const=const)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------- schema walking

def leaves(root, sections):
    """[(section, dataclass field, python type)] for every setting of the given sections of the schema `root`."""
    hints = typing.get_type_hints(root)
    out = []
    for sec in sections:
        cls = hints[sec]
        types = typing.get_type_hints(cls)
        out += [(sec, f, types[f.name]) for f in dataclasses.fields(cls)]
    return out


def base_type(typ):
    """X for Optional[X], else typ."""
    return typing.get_args(typ)[0] if typing.get_origin(typ) is typing.Union else typ


def flag_of(sec, f):
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list of strings",
            dict: "a mapping like '{a: 1, b: 2}'"}


def convert(value, typ, key):
    """Check/convert one value against its schema type; raise UserError naming the key."""
    if typing.get_origin(typ) is typing.Union:  # Optional[X]
        if value is None:
            return None
        typ = typing.get_args(typ)[0]
    if typing.get_origin(typ) is Literal:
        if value not in typing.get_args(typ):
            raise UserError(f"{key}: {value!r} is not one of {list(typing.get_args(typ))}")
        return value
    if typ is float and isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        with contextlib.suppress(ValueError):
            return float(value)
    value = [value] if typ is list and isinstance(value, str) else value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number,
          str: number or isinstance(value, str), dict: isinstance(value, dict),
          list: isinstance(value, list) and all(isinstance(v, str) for v in value)}
    if typ not in ok:
        raise TypeError(f"schema type {typ} of {key} is not handled")
    if not ok[typ]:
        raise UserError(f"{key}: expected {EXPECTED[typ]}, got {value!r}")
    return float(value) if typ is float else str(value) if typ is str else value


def check_range(value, f, key):
    m = f.metadata
    if value is None or isinstance(value, (bool, str, list, dict)):
        return
    if m["min"] is not None and value < m["min"]:
        raise UserError(f"{key}: must be >= {m['min']}, got {value!r}")
    if m["above"] is not None and value <= m["above"]:
        raise UserError(f"{key}: must be > {m['above']}, got {value!r}")
    if m["at_most"] is not None and value > m["at_most"]:
        raise UserError(f"{key}: must be <= {m['at_most']}, got {value!r}")


# ---------------------------------------------------------------- YAML + flags

def read_yaml(path):
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found - pass an existing file to --config")
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a YAML config file - pass a file to --config")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        problem = getattr(e, "problem", None) or first_line(e)
        raise UserError(f"{where}: YAML does not parse ({problem}) - fix the syntax on that line")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections (model:, training:, …) at the top level")
    return data


def overlay(raw, args):
    """The nested dict `raw` (from YAML) with {"section.key": value} written over it."""
    for key, value in args.items():
        sec, name = key.split(".")
        raw[sec] = raw[sec] if isinstance(raw.get(sec), dict) else {}
        raw[sec][name] = value
    return raw


def build(root, raw, sections, source, rules=lambda cfg: []):
    """Nested dict -> an instance of `root`, collecting every problem (rules(cfg): those across settings)
    before raising one UserError."""
    errors, values_of = [], {sec: {} for sec in sections}
    all_keys = [f"{s}.{f.name}" for s, f, _ in leaves(root, sections)]
    for sec, values in raw.items():
        if sec not in sections:
            hint = suggest(sec, list(sections))
            if not hint and not isinstance(values, dict):  # a bare key at the top level
                owner = [k for k in all_keys if k.endswith("." + str(sec))]
                hint = f" - it belongs at '{owner[0]}'" if owner else suggest(str(sec), all_keys)
            errors.append(f"unknown key '{sec}'{hint}")
            continue
        if not isinstance(values, dict):
            errors.append(f"{sec}: expected a mapping of settings, got {values!r}")
            continue
        names = {f.name: (f, t) for s, f, t in leaves(root, [sec])}
        for key, value in values.items():
            if key not in names:
                errors.append(f"unknown key '{sec}.{key}'{suggest(f'{sec}.{key}', all_keys)}")
                continue
            f, typ = names[key]
            try:
                value = convert(value, typ, f"{sec}.{key}")
                check_range(value, f, f"{sec}.{key}")
                values_of[sec][key] = value
            except UserError as e:
                errors.append(str(e))
    hints = typing.get_type_hints(root)
    cfg = root(**{sec: hints[sec](**values_of[sec]) for sec in sections})
    errors += rules(cfg) if not errors else []
    if errors:
        raise UserError(f"{source}: " + "; ".join(errors))
    return cfg


class Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line and suggests the closest flag."""

    def error(self, message):
        if "unrecognized arguments" in message:
            flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            bad = message.split(": ", 1)[1].split()[0].split("=")[0]
            message = f"unknown flag {bad}{suggest(bad, flags)} (see --help)"
        raise UserError(message)


def flag_value(typ, key):
    """argparse `type=` for a flag: the text is read as YAML for numbers/mappings, kept verbatim for strings."""
    def parse(text):
        base = base_type(typ)
        if base is str:
            return text
        try:
            value = yaml.safe_load(text) if base is not dict or text.strip().startswith("{") else dict(
                kv.split("=", 1) for kv in text.split(","))  # run_clm.py style: n_layer=4,n_embd=256
            if base is dict:
                value = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in value.items()}
        except (yaml.YAMLError, ValueError):
            raise argparse.ArgumentTypeError(f"{key}: cannot read {text!r}")
        try:
            return convert(value, typ, key)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e))
    return parse


def parse(root, argv, sections, description, config_default):
    """The command line: ({"section.key": value} of the flags given, the YAML path (--config, or the
    script's default), whether --config was given, whether --print-config was)."""
    args = vars(make_parser(root, sections, description, config_default).parse_args(argv))
    path, print_only = args.pop("config"), args.pop("print_config")
    args.pop("debug")  # main_guard reads --debug itself
    return args, path, any(a == "--config" or a.startswith("--config=") for a in argv), print_only


def require(raw, keys, root, sections, usage):
    """Fail, naming their flags, when the YAML and flags (raw, nested) leave any of the keys unset."""
    missing = [k for k in keys if k.split(".")[1] not in (raw.get(k.split(".")[0]) or {})]
    if missing:
        names = " and ".join(flag_of(sec, f) for sec, f, _ in leaves(root, sections) if f"{sec}.{f.name}" in missing)
        raise UserError(f"{names} {'is' if len(missing) == 1 else 'are'} required - e.g. {usage}")


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What a config loader decided for the user, to say before anything runs."""
    summary: Optional[str]  # the first log line of a run: the file read, what was dropped and chosen
    notes: dict             # {"section.key": why}: the values chosen for the user, marked by print_config
    sections: tuple
    print_only: bool        # --print-config: print the config (print_config) instead of running


def print_config(cfg, resolved):
    """--print-config: the config as YAML on stdout, led by what was decided and with the values chosen for the
    user marked. -> exit code 0"""
    print((f"# {resolved.summary}\n" if resolved.summary else "") + dump(cfg, resolved.sections, resolved.notes), end="")
    return 0


def make_parser(root, sections, description, config_default):
    p = Parser(description=description, argument_default=argparse.SUPPRESS, allow_abbrev=False,
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=config_default, help="YAML config file")
    p.add_argument("--print-config", action="store_true", default=False, help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", default=False, help="show tracebacks for errors")
    flat = [flag_of(s, f) for s, f, _ in leaves(root, sections)]
    for sec, f, typ in leaves(root, sections):
        key = f"{sec}.{f.name}"
        names = [flag_of(sec, f)] if flat.count(flag_of(sec, f)) == 1 else []
        names.append(f"--{sec}.{f.name.replace('_', '-')}")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(dest=key, help=f"{f.metadata['help']} [{key}] (default: {default})")
        if base_type(typ) is bool:
            p.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif typ is list:  # --data a b --data c gives [a, b, c]
            p.add_argument(*names, nargs="+", action="extend", metavar=key.split(".")[1].upper(), **kw)
        elif f.metadata["const"] is not None:
            p.add_argument(*names, nargs="?", const=f.metadata["const"], metavar=f"{f.metadata['const']}|VALUE", **kw)
        else:
            p.add_argument(*names, type=flag_value(typ, key), metavar=key.split(".")[1].upper(), **kw)
    return p


def replaced(cfg, values):
    """A copy of the (frozen) config with {"section.key": value} changed."""
    sections = {}
    for key, value in values.items():
        sec, name = key.split(".")
        sections.setdefault(sec, {})[name] = value
    return dataclasses.replace(cfg, **{sec: dataclasses.replace(getattr(cfg, sec), **v) for sec, v in sections.items()})


def markdown(root, scripts):
    """The settings as Markdown: a table per section (key, flag, default, meaning), each naming the scripts
    {script: sections} that read it. A flag is the short one where it is unique in all of them."""
    lines = []
    for sec in dict.fromkeys(s for secs in scripts.values() for s in secs):
        users = [name for name, secs in scripts.items() if sec in secs]
        flat = [[flag_of(s, f) for s, f, _ in leaves(root, scripts[u])] for u in users]
        lines += ["", f"### {sec}", "", f"Read by {', '.join(users)}.", "", "| key | flag | default | meaning |",
                  "|---|---|---|---|"]
        for _, f, typ in leaves(root, [sec]):
            short = all(names.count(flag_of(sec, f)) == 1 for names in flat)
            flag = flag_of(sec, f) if short else f"--{sec}.{f.name.replace('_', '-')}"
            flag = f"{flag} / --no-{flag[2:]}" if base_type(typ) is bool else flag
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = yaml.safe_dump(default, default_flow_style=True).removesuffix("...\n").strip()  # as YAML writes it
            lines.append(f"| `{sec}.{f.name}` | `{flag}` | `{default}` | {f.metadata['help'].replace('|', '/')} |")
    return "\n".join(lines[1:]) + "\n"


def to_dict(cfg, sections):
    d = dataclasses.asdict(cfg)
    return {s: d[s] for s in sections}


def dump(cfg, sections, notes=None):
    """The config as YAML; notes {"section.key": text} become comments on those keys' lines."""
    lines, sec = [], None
    for line in yaml.safe_dump(to_dict(cfg, sections), sort_keys=False).splitlines(keepends=True):
        sec = line.split(":")[0] if not line.startswith(" ") else sec
        key = f"{sec}.{line.strip().split(':')[0]}" if line.startswith("  ") and line[2] not in " -" else None
        lines.append(f"{line.rstrip()}  # {notes[key]}\n" if notes and key in notes else line)
    return "".join(lines)


