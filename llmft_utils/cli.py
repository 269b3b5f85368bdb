"""What every ``llmft-study`` verb shares: help that shows defaults, and ``--config FILE`` (JSON or YAML).

A config file holds the same settings as the flags, by their long names (``batch-size`` or ``batch_size``)::

    {"model": "smollm2-135m", "epochs": 4, "lr": 3e-5, "force": true}

It is read before the command line, which wins: ``--config a.json --epochs 2`` trains 2 epochs. Each value
goes through the flag's own parsing, so a bad one is refused with the flag's own message before any work.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


class ConfigError(ValueError):
    """A config file that cannot be read or names a setting the verb does not have."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with each flag's default after its text (``(default: 3e-05)``), except for flags whose default is
    off or empty, where it would only say ``None``; descriptions and epilogs keep their line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False or default in ([], "", argparse.SUPPRESS):
            return text
        if action.option_strings and action.nargs != 0:
            return f"{text} (default: %(default)s)"
        return text


def add_config_flag(ap: argparse.ArgumentParser, what: str = "flags") -> None:
    ap.add_argument("--config", metavar="FILE", default=None,
                    help=f"a JSON or YAML file of {what} by their long names; the command line wins")


def read_config(path: str) -> dict:
    """The object in a ``.json``, ``.yaml`` or ``.yml`` file; a clear error for anything else."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            value = yaml.safe_load(text)
        else:
            value = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise ConfigError(f"{path}: not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                          f"({str(e).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected an object of settings ({{\"name\": value, ...}}), "
                          f"got {type(value).__name__}")
    return value


def _options(ap: argparse.ArgumentParser) -> dict:
    """``dest -> action`` of the parser's long options (``--batch-size`` as ``batch_size``)."""
    out = {}
    for action in ap._actions:  # argparse has no public list of its actions
        for opt in action.option_strings:
            if opt.startswith("--"):
                out[opt[2:].replace("-", "_")] = action
    return out


def config_argv(ap: argparse.ArgumentParser, config: dict, path: str,
                extra: bool = False) -> tuple[list[str], dict]:
    """A config object as command-line tokens for ``ap`` (to go before the real ones) and, with ``extra``,
    the settings that are not flags (the caller's, e.g. notebook parameters); without it they are an error."""
    options = _options(ap)
    tokens, rest = [], {}
    for key, value in config.items():
        name = str(key).replace("-", "_")
        action = options.get(name)
        if name in ("config", "help", "version") or action is None:
            if extra and action is None:
                rest[str(key)] = value
                continue
            known = ", ".join(sorted(k for k in options if k not in ("config", "help", "version")))
            raise ConfigError(f"{path}: unknown setting {key!r} (settings: {known})")
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # a switch: true sets it, false leaves the default
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: {key!r} is a switch; give true or false, not {value!r}")
            if value:
                tokens.append(flag)
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(action, argparse._AppendAction):
            tokens += [t for v in values for t in (flag, _text(v))]
        elif action.nargs in ("*", "+") or isinstance(action.nargs, int):
            tokens += [flag, *map(_text, values)]
        else:
            if isinstance(value, (list, dict)):
                raise ConfigError(f"{path}: {key!r} takes one value, not {value!r}")
            tokens += [flag, _text(value)]
    return tokens, rest


def _text(value) -> str:
    return json.dumps(value) if isinstance(value, (bool, type(None), list, dict)) else str(value)


def with_config(ap: argparse.ArgumentParser, argv: list[str], extra: bool = False) -> tuple[list[str], dict]:
    """``argv`` with the tokens of its ``--config FILE`` (if any) in front, and the non-flag settings."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return list(argv), {}
    tokens, rest = config_argv(ap, read_config(known.config), known.config, extra=extra)
    return tokens + list(argv), rest


def parse(ap: argparse.ArgumentParser, argv, extra: bool = False) -> tuple[argparse.Namespace, dict]:
    """``ap.parse_args`` of ``argv`` (``sys.argv[1:]`` when None) behind its ``--config FILE``; a config
    error is the parser's usage error (exit 2). With ``extra``, also the settings that are not flags."""
    import sys

    try:
        argv, rest = with_config(ap, sys.argv[1:] if argv is None else list(argv), extra=extra)
    except ConfigError as e:
        ap.error(str(e))
    return ap.parse_args(argv), rest
