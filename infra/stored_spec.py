"""The spec a dataset was built with, kept in the store beside it (`<dataset>/_spec.yaml`).

Every run given a spec (a YAML file, or the stored one with command-line options over it) writes it there, through
the store, so S3 datasets carry it too; later commands on the dataset read it unless given --spec, so a `publish`
or `report` without --spec still applies the spec's filters.
"""

from __future__ import annotations

import yaml

from infra.settings import DatasetSpec, SpecError, build_spec
from infra.store import ArtifactStore, StoreError

SPEC_FILE = "_spec.yaml"


def spec_key(dataset: str) -> str:
    return f"{dataset}/{SPEC_FILE}"


def spec_yaml(spec: DatasetSpec) -> bytes:
    """The spec as given (unset fields left out); without `store`, which is where it is kept."""
    data = {k: v for k, v in spec.to_json().items() if k != "store"}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def save_spec(store: ArtifactStore, spec: DatasetSpec) -> bool:
    """Keep `spec` with its dataset (written only when it changed); True if written."""
    data = spec_yaml(spec)
    try:
        if store.get_bytes(spec_key(spec.name)) == data:
            return False
    except StoreError:  # none stored yet
        pass
    store.put_bytes(spec_key(spec.name), data)
    return True


def load_stored_spec(store: ArtifactStore, dataset: str) -> dict | None:
    """The stored spec of `dataset` as a mapping (validated), or None when the dataset has none."""
    try:
        raw = store.get_bytes(spec_key(dataset))
    except StoreError:
        return None
    where = f"the spec stored with the dataset ({store.uri}/{spec_key(dataset)})"
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise SpecError(f"{where} is not valid YAML: {e}; pass --spec to use another one") from None
    if not isinstance(data, dict):
        raise SpecError(f"{where} is not a YAML mapping; pass --spec to use another one")
    data["name"] = dataset
    build_spec(data, where)  # says which field is wrong, and where that spec lives
    return data
