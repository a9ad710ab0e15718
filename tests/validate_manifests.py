"""Validates Kubernetes manifests against the OpenAPI schemas that the
kubernetes-validate package ships, for every Kubernetes version it ships.
Offline by construction: the schemas are JSON files inside the package and
their references resolve inside the package (tests/manifests.rs runs this in
a network namespace with no interfaces up, so any download would fail).

Usage: validate_manifests.py FILE...

Prints one JSON object:
  {"versions": ["1.25.0", ...],
   "documents": [{"file", "index", "object", "schema": {VERSION: RESULT}}]}
one entry per non-empty YAML document, in file order. RESULT is
  "valid"            the strict schema for its apiVersion/kind accepted it,
  "no schema"        the package has no schema for it (CRDs, config files),
  "invalid: <why>"   the schema refused it (path and message).
Exits 0 when every file parsed; tests/manifests.rs decides what to accept.
"""

import json
import sys

import kubernetes_validate
import kubernetes_validate.utils
import yaml


def check(obj, version):
    try:
        # strict: the schemas with additionalProperties false, so a
        # misspelled or misplaced field is an error, not silently dropped.
        kubernetes_validate.validate(obj, version, strict=True)
        return "valid"
    except kubernetes_validate.SchemaNotFoundError:
        return "no schema"
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return "invalid: %s: %s" % (path, e.message)


def main():
    # all_versions() lists each version twice (plain and strict schema folders).
    versions = list(dict.fromkeys(kubernetes_validate.utils.all_versions()))
    documents = []
    for name in sys.argv[1:]:
        with open(name) as f:
            for index, obj in enumerate(yaml.safe_load_all(f)):
                if obj is None:
                    continue
                if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
                    results = {"-": "invalid: not an object with apiVersion and kind"}
                else:
                    results = {v: check(obj, v) for v in versions}
                documents.append({"file": name, "index": index, "object": obj, "schema": results})
    json.dump({"versions": versions, "documents": documents}, sys.stdout)


if __name__ == "__main__":
    main()
