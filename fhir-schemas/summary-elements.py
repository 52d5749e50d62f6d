#!/usr/bin/env python3
"""Builds summary-elements.json from HL7's profiles-resources.json (Bundle-resources.json in
npm hl7.fhir.r4.examples@4.0.1): for each resource type, its top-level elements marked
isSummary and those that are mandatory (min >= 1). Choice elements keep their `[x]` suffix.

    python3 fhir-schemas/summary-elements.py package/Bundle-resources.json > fhir-schemas/summary-elements.json
"""
import json
import sys

bundle = json.load(open(sys.argv[1]))
out = {}
for entry in bundle["entry"]:
    sd = entry["resource"]
    if sd.get("resourceType") != "StructureDefinition" or sd.get("kind") != "resource":
        continue
    if sd.get("derivation") == "constraint" or sd.get("abstract"):
        continue
    name = sd["type"]
    summary, mandatory = [], []
    for el in sd["snapshot"]["element"]:
        path = el["path"].split(".")
        if len(path) != 2:
            continue
        if el.get("isSummary"):
            summary.append(path[1])
        if el.get("min", 0) >= 1:
            mandatory.append(path[1])
    out[name] = {"summary": summary, "mandatory": mandatory}
json.dump(out, sys.stdout, indent=1, sort_keys=True)
sys.stdout.write("\n")
