"""One set of cases, two judges: every file under valid/ and invalid/ goes through the real API server (``kubectl
create --dry-run=server`` against the CRD of crds/) and through ``ddm validate``. Both must accept every valid/ file,
and both must refuse every invalid/ file naming the field of its ``# expect:`` line (list indices written as dots:
``tolerations[0]`` is ``tolerations.0``). One kubectl call judges all files, so the API-server half takes seconds."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from fixtures.k8s import ControlPlane, fresh_namespace

from ddm_operator.api.models import GROUP, PLURAL, VERSION
from ddm_operator.cli import check_file, main

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

CASES = Path(__file__).resolve().parent
VALID = sorted((CASES / "valid").glob("*.yaml"))
INVALID = sorted((CASES / "invalid").glob("*.yaml"))


def expected_field(path: Path) -> str:
    match = re.search(r"^# expect: (\S+)$", path.read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{path} has no '# expect: field.path' line")
    return match.group(1)


def names_field(text: str, field: str) -> bool:
    """``field`` (dotted, e.g. spec.experts.overrides.0.experts) appears as a path in ``text``."""
    return re.search(re.escape(field) + r"($|[^A-Za-z0-9])", re.sub(r"\[(\d+)\]", r".\1", text)) is not None


@pytest.fixture(scope="module")
def namespace(k8s_cluster: ControlPlane) -> Iterator[str]:
    with fresh_namespace(k8s_cluster, "cases") as name:
        yield name


@pytest.fixture(scope="module")
def server(k8s_cluster: ControlPlane, namespace: str) -> tuple[dict[str, str], str]:
    """(file name -> the API server's complaints about its objects, stdout of the objects it accepted)."""
    proc = k8s_cluster.kubectl("create", "--dry-run=server", "-n", namespace,
                               "-f", str(CASES / "valid"), "-f", str(CASES / "invalid"), check=False)
    complaints: dict[str, str] = {}
    for chunk in re.split(r"\n(?=Error from server|error:)", proc.stderr):
        match = re.search(r'error when \w+ "([^"]+)"', chunk)
        if match is None:
            assert not chunk.strip(), f"kubectl said something about no file: {chunk}"
            continue
        name = Path(match.group(1)).name
        complaints[name] = complaints.get(name, "") + chunk
    return complaints, proc.stdout


def dry_run_names(path: Path) -> list[str]:
    return [f"{str(doc['kind']).lower()}/{doc['metadata']['name']}"
            for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_there_is_a_case_for_every_gap() -> None:
    assert len(VALID) >= 6 and len(INVALID) >= 30
    names = {p.name for p in VALID + INVALID}
    assert len(names) == len(VALID) + len(INVALID), "valid/ and invalid/ share a file name"


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_case_is_accepted_by_both(server: tuple[dict[str, str], str], path: Path) -> None:
    complaints, accepted = server
    assert path.name not in complaints, complaints[path.name]
    for name in dry_run_names(path):
        assert re.search(rf"^{re.escape(name.split('/')[0])}\S*/{re.escape(name.split('/')[1])} created", accepted,
                         re.MULTILINE), f"{name} not in kubectl's output:\n{accepted}"
    errors, _ = check_file(path)
    assert errors == [], errors


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_case_is_refused_by_both_naming_the_field(server: tuple[dict[str, str], str], path: Path) -> None:
    field = expected_field(path)
    complaints, _ = server
    assert path.name in complaints, f"the API server accepted {path.name}"
    assert names_field(complaints[path.name], field), f"API server: {field} not named in {complaints[path.name]}"
    errors, _ = check_file(path)
    assert errors, f"ddm validate accepted {path.name}"
    assert any(names_field(line, field) for line in errors), f"ddm validate: {field} not named in {errors}"


def test_validate_skips_other_kinds_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    path = CASES / "valid" / "secret-and-ddm.yaml"
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: document 0: skipped (v1 Secret: not a DecentralizedDiffusion)", f"{path}: ok"]


def test_class_conditional_is_immutable_and_get_shows_k(k8s_cluster: ControlPlane, namespace: str) -> None:
    """classConditional changes the model as modelPreset does; `kubectl get` shows K, `-o wide` the progress."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    body: dict[str, Any] = yaml.safe_load((CASES / "valid" / "class-conditional.yaml").read_text())
    with k8s_cluster.api_client() as api:
        custom = client.CustomObjectsApi(api)
        created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        created["spec"]["experts"]["classConditional"] = False
        with pytest.raises(ApiException) as info:
            custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body["metadata"]["name"], created)
    assert "spec.experts.classConditional is immutable" in str(info.value.body)
    table = k8s_cluster.kubectl("get", "ddm", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert table[0].split()[:4] == ["NAME", "PHASE", "READY", "K"] and "PROGRESS" in table[0]
    assert table[1].split()[:2] == ["ok-class-conditional", "4"]  # no status yet: PHASE and READY are empty
