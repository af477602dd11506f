"""Dataset ids, local paths and the section rules (shared with the agent's engine)."""

from __future__ import annotations

from pathlib import Path

from remote_agent import usrsync_agent as engine
from usrsync.errors import UsrError

SECTIONS = engine.SECTIONS
PRIMARY, META, EVENTS = engine.PRIMARY, engine.META, engine.EVENTS
SNAPSHOTS, DERIVED, AUXILIARY = engine.SNAPSHOTS, engine.DERIVED, engine.AUXILIARY
classify = engine.classify
unsafe_path_reason = engine.unsafe_path_reason


def section_relative(path: str, section: str) -> str:
    """Audit paths are relative to their section dir, except `_auxiliary` (dataset-relative)."""
    if section in (SNAPSHOTS, DERIVED):
        return path.split("/", 1)[1]
    return path


def parse_dataset(arg: str, root: Path) -> str:
    """A dataset id from the DATASET argument: an id, or a path to a dataset dir under root."""
    candidate = Path(arg).expanduser()
    if candidate.is_dir() and (arg.startswith(("/", ".", "~")) or candidate.is_absolute()):
        resolved = candidate.resolve()
        try:
            dataset = resolved.relative_to(root.resolve()).as_posix()
        except ValueError:
            raise UsrError(
                f"dataset directory {resolved} is not under the datasets root {root}",
                "pass a dataset id, or set --root / USR_ROOT to the directory that holds it",
            ) from None
    else:
        dataset = arg.strip("/") if not arg.startswith("/") else arg
    check_dataset_id(dataset)
    return dataset


def check_dataset_id(dataset: str) -> None:
    try:
        engine.check_dataset_id(dataset)
    except engine.AgentError as exc:
        raise UsrError(
            exc.message,
            "a dataset id is a relative path like 'my_dataset' or 'densegen/my_dataset'",
        ) from None
    if any(part.startswith("-") for part in dataset.split("/")):
        raise UsrError(f"unsafe dataset id {dataset!r}: a component starts with '-'",
                       "rename the dataset so no path component starts with '-'")


def local_dataset_dir(root: Path, dataset: str) -> Path:
    return root.joinpath(*dataset.split("/"))
