#!/usr/bin/env python3
"""Builds structure-rules.json: the parts of the official R4 StructureDefinitions that structural
validation reads (snapshot elements: id, path, min, max, type codes, contentReference, required
bindings, fixed/pattern values, slicing, FHIRPath constraints), and the expansions of the value
sets that required bindings name (complete expansions only: a value set R4 could not expand,
such as mime types, is not checked).

Usage: structure-rules.py PACKAGE_DIR > structure-rules.json
where PACKAGE_DIR is the extracted `package/` of npm hl7.fhir.r4.examples@4.0.1 (it holds
Bundle-resources.json, Bundle-types.json and Bundle-valueset-expansions.json).
"""
import json
import sys

KEEP = ("id", "path", "sliceName", "min", "max", "contentReference", "slicing")


def element(e):
    out = {k: e[k] for k in KEEP if k in e}
    types = [t["code"] for t in e.get("type", [])]
    if types:
        out["type"] = types
    for k, v in e.items():
        if k.startswith("fixed") or k.startswith("pattern"):
            out[k] = v
    b = e.get("binding")
    if b and b.get("strength") == "required" and "valueSet" in b:
        out["binding"] = {"strength": "required", "valueSet": b["valueSet"]}
    cs = [
        {"key": c["key"], "severity": c["severity"], "human": c.get("human", ""), "expression": c["expression"]}
        for c in e.get("constraint", [])
        if "expression" in c
    ]
    if cs:
        out["constraint"] = cs
    return out


def structures(bundle):
    for entry in bundle["entry"]:
        r = entry["resource"]
        if r["resourceType"] != "StructureDefinition" or "snapshot" not in r:
            continue
        if r["kind"] in ("resource", "complex-type") and r.get("derivation") != "constraint":
            yield {
                "url": r["url"],
                "name": r["name"],
                "type": r["type"],
                "kind": r["kind"],
                "snapshot": {"element": [element(e) for e in r["snapshot"]["element"]]},
            }


def codes(contains, out):
    for c in contains:
        if "code" in c and not c.get("abstract", False):
            out.append(f"{c.get('system', '')}|{c['code']}")
        codes(c.get("contains", []), out)


def main():
    pkg = sys.argv[1]
    load = lambda name: json.load(open(f"{pkg}/{name}", encoding="utf-8"))
    sds = list(structures(load("Bundle-resources.json"))) + list(structures(load("Bundle-types.json")))
    required = set()
    for sd in sds:
        for e in sd["snapshot"]["element"]:
            if "binding" in e:
                required.add(e["binding"]["valueSet"].split("|")[0])
    value_sets = {}
    for entry in load("Bundle-valueset-expansions.json")["entry"]:
        vs = entry["resource"]
        if vs.get("url") in required and "expansion" in vs:
            exp = vs["expansion"]
            # a partial expansion (too costly, or a limited one) cannot say a code is wrong
            partial = any(e.get("url", "").endswith("valueset-toocostly") for e in exp.get("extension", [])) or any(
                p.get("name") == "limitedExpansion" for p in exp.get("parameter", [])
            )
            if partial or not exp.get("contains"):
                continue
            out = []
            codes(vs["expansion"].get("contains", []), out)
            value_sets[vs["url"]] = sorted(set(out))
    json.dump(
        {"structures": sds, "valueSets": dict(sorted(value_sets.items()))},
        sys.stdout,
        separators=(",", ":"),
        sort_keys=False,
    )


main()
