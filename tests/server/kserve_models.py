"""Manifests checked against KServe's own models, in a process of its own (see
tests/server/test_kserve_runtime.py, `model_check`, for why):

    python -m tests.server.kserve_models deploy/kserve/*.yaml

prints one JSON line: {"<kind>/<name>": [problems, ...], ...}, an empty list for a document
KServe's and Kubernetes' models take as it is written.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

MODELS = {"ServingRuntime": "V1alpha1ServingRuntime", "InferenceService": "V1beta1InferenceService"}
API_VERSIONS = {"ServingRuntime": "serving.kserve.io/v1alpha1", "InferenceService": "serving.kserve.io/v1beta1"}


class Models:
    """KServe's SDK models (generated from its CRDs' OpenAPI schema) built field by field, unknown
    fields refused; the Kubernetes types inside them (containers, probes, volumes) through
    Kubernetes' own `ApiClient.deserialize`, whose pydantic models check types and required
    fields (and drop unknown ones without a word: `lost` finds those)."""

    def __init__(self) -> None:
        import kserve.models
        import kubernetes.client

        self.kserve = kserve.models
        self.k8s = kubernetes.client.ApiClient()

    def load(self, data: Any, klass: Any, path: str = "") -> Any:
        """`data` as an instance of `klass` (a model class or KServe's type string). Raises
        AssertionError naming the path of a field no model has, or a wrong type."""
        if isinstance(klass, str):
            if match := re.fullmatch(r"list\[(.+)\]", klass):
                assert isinstance(data, list), f"{path}: expected a list"
                return [self.load(item, match[1], f"{path}[{i}]") for i, item in enumerate(data)]
            if match := re.fullmatch(r"dict\(([^,]*), (.+)\)", klass):
                assert isinstance(data, dict), f"{path}: expected a mapping"
                return {key: self.load(value, match[2], f"{path}.{key}") for key, value in data.items()}
            primitive = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
            if klass in primitive:
                assert isinstance(data, primitive[klass]), f"{path}: {data!r} is not a {klass}"
                return data
            if not hasattr(self.kserve, klass):
                return self.k8s.deserialize(json.dumps(data), klass, "application/json")
            klass = getattr(self.kserve, klass)
        assert isinstance(data, dict), f"{path}: expected a mapping"
        unknown = set(data) - set(klass.attribute_map.values())
        assert not unknown, f"{path}: {klass.__name__} has no field(s) {sorted(unknown)}"
        keys = {key: attr for attr, key in klass.attribute_map.items()}
        return klass(**{keys[k]: self.load(v, klass.openapi_types[keys[k]], f"{path}.{k}") for k, v in data.items()})

    def dump(self, obj: Any) -> Any:
        """`obj` back as the plain data a manifest holds."""
        if isinstance(obj, list):
            return [self.dump(item) for item in obj]
        if isinstance(obj, dict):
            return {key: self.dump(value) for key, value in obj.items()}
        if hasattr(obj, "attribute_map"):  # KServe's
            return {key: self.dump(getattr(obj, attr)) for attr, key in obj.attribute_map.items()
                    if getattr(obj, attr) is not None}
        return self.k8s.sanitize_for_serialization(obj)  # Kubernetes' (or a plain value)


def lost(written: Any, read: Any, path: str = "") -> list[str]:
    """The paths of `written` that `read` does not hold with the same value (the models may add
    their defaults, such as a model's empty container name: those are not losses)."""
    if isinstance(written, dict):
        if not isinstance(read, dict):
            return [path]
        return [p for key, value in written.items()
                for p in (lost(value, read[key], f"{path}.{key}") if key in read else [f"{path}.{key} was dropped"])]
    if isinstance(written, list):
        if not isinstance(read, list) or len(read) != len(written):
            return [path]
        return [p for i, (w, r) in enumerate(zip(written, read)) for p in lost(w, r, f"{path}[{i}]")]
    return [] if written == read else [f"{path} ({written!r} became {read!r})"]


def problems(models: Models, doc: dict[str, Any]) -> list[str]:
    kind = doc.get("kind")
    if kind not in MODELS:
        return [f"unknown kind {kind!r}"]
    if doc.get("apiVersion") != API_VERSIONS[kind]:
        return [f"apiVersion {doc.get('apiVersion')!r}, expected {API_VERSIONS[kind]}"]
    try:
        obj = models.load(doc, MODELS[kind], kind)
    except Exception as exc:  # pydantic's and KServe's validation errors, and the unknown fields above
        return [f"{type(exc).__name__}: {exc}"]
    return lost(doc, models.dump(obj))


def main(paths: list[str]) -> int:
    models = Models()
    found = {}
    for path in paths:
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if doc:
                found[f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"] = problems(models, doc)
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
