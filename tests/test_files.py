"""The one YAML reader and the one atomic writer every config and result goes through."""

from pathlib import Path

import pytest

from pipelines.files import atomic_path, read_yaml, write_text_atomic


class RoleError(ValueError):
    pass


def test_read_yaml_reads_a_mapping_and_an_empty_file_as_empty(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("x: 1\n")
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "a.yaml", "run config") == {"x": 1}
    assert read_yaml(tmp_path / "empty.yaml", "run config") == {}


def test_read_yaml_errors_name_the_file_and_its_role(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="sweep config not found: .*missing.yaml"):
        read_yaml(tmp_path / "missing.yaml", "sweep config")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(RoleError, match=r"(?s)bad.yaml: not valid YAML.*line"):
        read_yaml(tmp_path / "bad.yaml", "stream config", error=RoleError)
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert read_yaml(tmp_path / "list.yaml", "run config") == [1]
    with pytest.raises(RoleError, match="list.yaml: expected a mapping at the top level, got list"):
        read_yaml(tmp_path / "list.yaml", "stream config", error=RoleError, mapping=True)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out" / "record.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["record.json"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["record.json"]
