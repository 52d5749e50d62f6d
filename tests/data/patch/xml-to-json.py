#!/usr/bin/env python3
"""Converts HL7's FHIRPath Patch test cases (fhir-patch-tests.xml, FHIR XML) to FHIR JSON.

Usage: xml-to-json.py fhir-patch-tests.xml ../../../fhir-schemas/fhir.schema.json > fhir-patch-tests.json

The source is r4/patch/fhir-patch-tests.xml of FHIR/fhir-test-cases (Apache-2.0), as shipped in
../shared/testdata/fhir-test-cases-r4.tgz. XML elements become JSON properties by the official R4
JSON Schema: lists where an element repeats, numbers and booleans where the primitive type is one,
nested resources with their resourceType. Each case keeps its name, mode, input, diff (the
Parameters), and output or error.
"""
import json
import sys
import xml.etree.ElementTree as ET

NS = "{http://hl7.org/fhir}"
xml_path, schema_path = sys.argv[1], sys.argv[2]
defs = json.load(open(schema_path))["definitions"]


def ref(prop):
    if prop.get("type") == "array":
        prop = prop["items"]
    r = prop.get("$ref", "")
    return r.rsplit("/", 1)[-1] if r else None


def primitive(value, type_name):
    d = defs.get(type_name, {})
    if d.get("type") == "boolean":
        return value == "true"
    if d.get("type") == "number":
        return int(value) if value.lstrip("-").isdigit() else float(value)
    return value


def element(node, type_name):
    if type_name == "ResourceList":
        inner = list(node)[0]
        return resource(inner)
    d = defs.get(type_name, {})
    if "properties" not in d:  # a primitive
        return primitive(node.get("value"), type_name)
    out = {}
    for child in node:
        name = child.tag.replace(NS, "")
        if name.endswith("}div"):
            name = "div"
        if name == "div":
            ET.register_namespace("", "http://www.w3.org/1999/xhtml")
            out["div"] = ET.tostring(child, encoding="unicode").strip()
            continue
        prop = d["properties"][name]
        inline = prop.get("items", prop).get("type")
        if ref(prop) is None and inline in ("number", "boolean", "string"):
            value = primitive(child.get("value"), {"number": "decimal", "boolean": "boolean"}.get(inline, "string"))
        else:
            value = element(child, ref(prop))
        if prop.get("type") == "array":
            out.setdefault(name, []).append(value)
        else:
            out[name] = value
    return out


def resource(node):
    name = node.tag.replace(NS, "")
    return {"resourceType": name, **element(node, name)}


cases = []
for case in ET.parse(xml_path).getroot():
    if case.tag != "case":
        continue
    c = {"name": case.get("name"), "mode": case.get("mode")}
    c["input"] = resource(list(case.find("input"))[0])
    c["diff"] = resource(list(case.find("diff"))[0])
    if case.find("output") is not None:
        c["output"] = resource(list(case.find("output"))[0])
    if case.find("error") is not None:
        c["error"] = case.find("error").get("msg")
    cases.append(c)
json.dump(cases, sys.stdout, indent=1, ensure_ascii=False)
print()
