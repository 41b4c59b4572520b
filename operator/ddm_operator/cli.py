"""``ddm``: validate specs, print/write the CRD, and run the pipeline locally (run/status/sample).

``ddm validate SPEC.yaml [...]`` checks full DecentralizedDiffusion manifests with the API models and the same
cross-field rules as the CRD's CEL; it prints ``FILE: ok`` or one ``FILE: field.path: message`` line per error.
Exit codes: 0 ok, 1 invalid spec, 2 usage / unreadable file.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import ValidationError

from .api.models import GROUP, KIND, PATTERN_NAMES, DecentralizedDiffusion

LOCAL_COMMANDS = "ddm_operator.local.commands"


def format_errors(err: ValidationError) -> list[str]:
    """One line per error, ``field.path: message (got value)``, camelCase paths as written in YAML."""
    lines = []
    for e in err.errors():
        if e["type"] == "ddm_rule":  # cross-field rules already name their full field path
            lines.extend(e["ctx"]["lines"].splitlines())
            continue
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        if e["type"] == "ddm_field":  # a model's own rules: one "field: message" line each, relative to the model
            lines.extend(f"{loc}.{line}" if e["loc"] else line for line in e["ctx"]["lines"].splitlines())
            continue
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] == "string_pattern_mismatch" and e["ctx"]["pattern"] in PATTERN_NAMES:
            msg = f"must be {PATTERN_NAMES[e['ctx']['pattern']]}"
        got = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(e["input"], dict) else f" (got {e['input']!r})"
        lines.append(f"{loc}: {msg}{got}")
    return lines


def validate_document(doc: Any) -> list[str]:
    """Errors of one parsed manifest (empty: valid)."""
    if not isinstance(doc, dict):
        return [f"(root): expected a mapping (a DecentralizedDiffusion manifest), got {type(doc).__name__}"]
    try:
        DecentralizedDiffusion.model_validate(doc)
    except ValidationError as err:
        return format_errors(err)
    return []


class _Loader(yaml.SafeLoader):
    """YAML as the API server reads it: ``1e-4`` is a number (PyYAML's YAML 1.1 wants a dot: ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?([0-9][0-9_]*)?\.?[0-9]+[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """One YAML document, numbers read as the API server reads them."""
    return yaml.load(text, Loader=_Loader)


def _is_ours(doc: Any) -> bool:
    """A document meant as a DecentralizedDiffusion (our kind or our API group), as opposed to a Secret beside it."""
    if not isinstance(doc, dict):
        return True
    return doc.get("kind") == KIND or str(doc.get("apiVersion", "")).split("/")[0] == GROUP


def check_file(path: Path) -> tuple[list[str], list[str]]:
    """(errors, notes) of a YAML file: every DecentralizedDiffusion in it is validated, other kinds (a Secret, a
    Namespace) are skipped with a note; lines are prefixed by the document index when there are several."""
    try:
        docs = [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]
    except OSError as err:
        return [f"cannot read: {err.strerror}"], []
    except yaml.YAMLError as err:
        return [f"not valid YAML: {str(err).splitlines()[0]}"], []
    if not any(_is_ours(d) for d in docs):
        return ["no DecentralizedDiffusion manifest in the file"], []
    lines: list[str] = []
    notes: list[str] = []
    for i, doc in enumerate(docs):
        prefix = f"document {i}: " if len(docs) > 1 else ""
        if _is_ours(doc):
            lines.extend(prefix + line for line in validate_document(doc))
        else:
            notes.append(f"{prefix}skipped ({doc.get('apiVersion')} {doc.get('kind')}: not a {KIND})")
    return lines, notes


def validate_file(path: Path) -> list[str]:
    """Errors of every DecentralizedDiffusion in a YAML file (empty: valid); see ``check_file``."""
    return check_file(path)[0]


def cmd_validate(args: argparse.Namespace) -> int:
    failed = False
    for name in args.specs:
        errors, notes = check_file(Path(name))
        for line in notes:
            print(f"{name}: {line}")
        if errors:
            failed = True
            for line in errors:
                print(f"{name}: {line}")
        else:
            print(f"{name}: ok")
    return 1 if failed else 0


def cmd_crd(args: argparse.Namespace) -> int:
    from .api.crd import render_crd, write_crd

    if args.write:
        for path in write_crd(Path(args.root)):
            print(f"wrote {path}")
    else:
        sys.stdout.write(render_crd())
    return 0


def _local(name: str) -> Callable[[argparse.Namespace], int]:
    """Delegate to the local runner, imported only when used (and only if it exists)."""

    def run(args: argparse.Namespace) -> int:
        try:
            module = importlib.import_module(LOCAL_COMMANDS)
        except ModuleNotFoundError as err:
            if err.name != LOCAL_COMMANDS:
                raise
            print(f"ddm {name}: the local runner ({LOCAL_COMMANDS}) is not installed", file=sys.stderr)
            return 2
        result = getattr(module, f"cmd_{name}")(args)
        return int(result or 0)

    return run


OWN_COMMANDS = ("validate", "crd")


def build_parser(load_local: bool = True) -> argparse.ArgumentParser:
    """``load_local=False`` keeps validate/crd independent of the local runner's imports."""
    parser = argparse.ArgumentParser(prog="ddm", description="Decentralized Diffusion Models: specs, CRD, local runs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check DecentralizedDiffusion manifests (models + CEL rules)")
    p.add_argument("specs", nargs="+", metavar="SPEC.yaml")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("crd", help="print the CRD, or write it into crds/ and the chart")
    p.add_argument("--write", action="store_true", help="write crds/ and the chart's templates/crd.yaml under --root")
    p.add_argument("--root", default=".", help="repository root (default: the current directory)")
    p.set_defaults(func=cmd_crd)

    local = None
    if load_local:  # the local runner may register its own run/status/sample subcommands with full options
        try:
            local = importlib.import_module(LOCAL_COMMANDS)
        except ModuleNotFoundError as err:
            if err.name != LOCAL_COMMANDS:
                raise
    if local is not None and hasattr(local, "add_subcommands"):
        local.add_subcommands(sub)
    else:
        for name, help_text in (("run", "run the pipeline locally"), ("status", "show a local run's status"),
                                ("sample", "sample images from a trained run")):
            p = sub.add_parser(name, help=help_text)
            p.add_argument("spec", metavar="SPEC.yaml")
            p.set_defaults(func=_local(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(load_local=command not in OWN_COMMANDS).parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
