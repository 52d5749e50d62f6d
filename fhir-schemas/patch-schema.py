#!/usr/bin/env python3
"""Rebuild fhir-schemas/fhir.schema.json from HL7's file, fixing two known defects of it.

Usage: patch-schema.py ORIGINAL_fhir.schema.json > fhir-schemas/fhir.schema.json

1. The FHIRVersion enums lack "4.0.1" (the version the schema describes).
2. Elements of type `canonical` have no `_name` sibling for their primitive extensions and ids,
   which FHIR JSON allows for every primitive (official examples use it, e.g. `type[0]._profile`).
3. Complex types and resources are described by `properties` without `"type": "object"`, so a
   string or number given where an object belongs (`"meta": "x"`, `"code": 1`) passes.
"""
import json
import sys

text = open(sys.argv[1], encoding="utf-8").read()
text = text.replace('"4.0.0"\n', '"4.0.0",\n            "4.0.1"\n')
schema = json.loads(text)
for name, definition in schema["definitions"].items():
    if "properties" in definition and "type" not in definition:
        definition["type"] = "object"
    props = definition.get("properties", {})
    for prop, spec in list(props.items()):
        ref = spec.get("$ref") or (spec.get("items") or {}).get("$ref")
        if ref == "#/definitions/canonical" and "_" + prop not in props:
            if "items" in spec:
                props["_" + prop] = {"type": "array", "items": {"$ref": "#/definitions/Element"}}
            else:
                props["_" + prop] = {"$ref": "#/definitions/Element"}
json.dump(schema, sys.stdout, indent=2, ensure_ascii=False)
sys.stdout.write("\n")
