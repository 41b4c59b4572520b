"""``ddm-train STAGE --config FILE``: run one stage of the pipeline.

The config is YAML or JSON (a file path, or ``-`` for stdin); ``--set a.b=value`` overrides single keys.
Exit codes: see ``ddm_trainer.errors.ExitCode`` (1-127 permanent, 128-255 retryable).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from .configs import STAGES
from .errors import ConfigError, DDMError, ExitCode


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _set(tree: dict[str, Any], dotted: str) -> None:
    key, sep, raw = dotted.partition("=")
    if not sep:
        raise ConfigError(f"--set expects key=value, got {dotted!r}")
    try:
        import yaml

        value = yaml.safe_load(raw)
    except Exception:
        value = raw
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def format_validation_error(err: Any, source: str) -> str:
    """pydantic errors as one line per field: ``field.path: message (got value)``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {loc}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "missing" else ""))
    return "; ".join(lines)


def load_config(stage: str, path: str, overrides: list[str] | None = None) -> Any:
    import yaml
    from pydantic import ValidationError

    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} (choose from {', '.join(STAGES)})")
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(tree).__name__}")
    for o in overrides or []:
        _set(tree, o)
    cls = _load(STAGES[stage][0])
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, path)) from None


def run_stage(stage: str, config: Any) -> None:
    _load(STAGES[stage][1])(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddm-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--config", required=True, help="YAML/JSON config file, or - for stdin")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    parser.add_argument("--print-config", action="store_true", help="print the validated config and exit")
    args = parser.parse_args(argv)
    from .progress import install_preemption_handler

    install_preemption_handler()
    try:
        config = load_config(args.stage, args.config, args.set)
        if args.print_config:
            print(json.dumps(config.model_dump(mode="json"), indent=2))
            return 0
        run_stage(args.stage, config)
        return 0
    except DDMError as e:
        print(f"ddm-train {args.stage}: error: {e}", file=sys.stderr)
        return int(e.exit_code)
    except MemoryError as e:
        print(f"ddm-train {args.stage}: error: out of memory: {e}", file=sys.stderr)
        return int(ExitCode.OUT_OF_MEMORY)
    except Exception as e:  # torch.cuda.OutOfMemoryError has no import-free name; match by class name
        if type(e).__name__ == "OutOfMemoryError":
            print(f"ddm-train {args.stage}: error: out of GPU memory: {e}", file=sys.stderr)
            return int(ExitCode.OUT_OF_MEMORY)
        if isinstance(e, (ConnectionError, TimeoutError)):
            print(f"ddm-train {args.stage}: error: I/O: {e}", file=sys.stderr)
            return int(ExitCode.STORE_IO)
        raise


if __name__ == "__main__":
    sys.exit(main())
