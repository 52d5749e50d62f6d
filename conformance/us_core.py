#!/usr/bin/env python3
"""US Core 6.1 server conformance, walked from US Core's own CapabilityStatement.

Usage: us_core.py --binary target/release/fhirvault [--definitions DIR] [--examples DIR]
                  [--backends sqlite,postgres]

The definitions (`CapabilityStatement-us-core-server.json`, `SearchParameter-*.json`) default to
`profiles/us-core-6.1.0/`, the examples to `tests/data/us-core/example/`: both copied unchanged
from the official package `hl7.fhir.us.core` 6.1.0 (see their SOURCES). For each backend the
script starts the binary with `profile_dir` naming the repository's `profiles/` (US Core's
profiles and SearchParameters), stores every example of the package as it is (ids kept), and then
walks `CapabilityStatement-us-core-server.json` itself, not a list typed here: for every resource
type it lists, every search parameter and every search-parameter combination whose expectation
is SHALL or SHOULD, every comparator and `multipleOr` the SearchParameter marks SHALL, every
`_include` and `_revinclude`, it builds the search from each example of the type (the values
come from the SearchParameter's own FHIRPath expression, evaluated by fhirpathpy from PyPI) and
runs it with a patient-context token (`patient/*.rs`) of the example's patient, the way a
patient app certified under ONC (g)(10) would. A search passes when the example is among the
results; an include when what the example references (and the token may read) comes with it.

Every search is printed with its result; the summary counts SHALL and SHOULD apart. Exits 1
when a SHALL search fails (SHOULD failures are reported, not fatal), so a new US Core version
is one package away.
"""

import argparse
import datetime
import glob
import json
import os
import pathlib
import re
import subprocess
import sys
import urllib.parse
from collections import Counter

import requests
from fhirpathpy import evaluate
from fhirpathpy.models import models as fhirpath_models

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import suite  # noqa: E402  (Server, PgCluster: the conformance suite's own harness)

EXPECTATION = "http://hl7.org/fhir/StructureDefinition/capabilitystatement-expectation"
COMBINATION = "http://hl7.org/fhir/StructureDefinition/capabilitystatement-search-parameter-combination"
RESULTS = Counter()
FAILURES = []


def expectation(element):
    for e in (element or {}).get("extension", []):
        if e.get("url") == EXPECTATION:
            return e.get("valueCode")
    return None


def record(level, ok, what):
    RESULTS[(level, ok)] += 1
    print(f"  {'pass' if ok else 'FAIL'} [{level}] {what}")
    if not ok:
        FAILURES.append(f"[{level}] {what}")


def values(resource, definition):
    """The values `definition` (a SearchParameter) indexes on `resource`, from its expression."""
    expression = definition.get("expression")
    if not expression:
        return []
    # fhirpathpy has no resolve(): the reference's type narrows instead (see search_value)
    expression = re.sub(r"\.where\(resolve\(\) is \w+\)", "", expression)
    try:
        # the R4 model resolves choice elements (`Observation.effective` → effectiveDateTime …)
        return [v for v in evaluate(resource, expression, model=fhirpath_models["r4"]) if v is not None]
    except Exception:  # an expression fhirpathpy cannot evaluate: no value, no search
        return []


def utc_day(value, last=False):
    """The UTC day of a FHIR date or dateTime (a partial date: its first, or with `last` its last, day)."""
    if len(value) > 10:
        t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if t.tzinfo:
            t = t.astimezone(datetime.timezone.utc)
        return t.date()
    if len(value) == 10:
        return datetime.date.fromisoformat(value)
    year = int(value[:4])
    month = int(value[5:7]) if len(value) >= 7 else (12 if last else 1)
    if not last:
        return datetime.date(year, month, 1)
    following = datetime.date(year + (month == 12), month % 12 + 1, 1)
    return following - datetime.timedelta(days=1)


def date_range(value):
    """The first and last UTC day a date, dateTime, instant or Period covers."""
    if isinstance(value, dict):
        start, end = value.get("start"), value.get("end")
        start, end = start or end, end or start
    else:
        start = end = value
    if not isinstance(start, str):
        return None
    return utc_day(start), utc_day(end, last=True)


def eq_value(value):
    """A search value whose range contains the whole of the indexed value (what `eq` matches):
    its UTC day, month or year."""
    r = date_range(value)
    if r is None:
        return None
    first, last = r
    if first == last:
        return first.isoformat()
    if (first.year, first.month) == (last.year, last.month):
        return first.isoformat()[:7]
    return str(first.year) if first.year == last.year else None


def search_value(value, kind, targets):
    """The search value a client would send for an indexed value, or None."""
    if kind == "token":
        if isinstance(value, dict):
            coding = (value.get("coding") or [value])[0]
            system, code = coding.get("system"), coding.get("code") or coding.get("value")
            if code is None:
                return None
            return f"{system}|{code}" if system else code
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)
    if kind == "reference":
        ref = value.get("reference") if isinstance(value, dict) else None
        if not ref or ref.startswith("#") or ref.startswith("urn:"):
            return None
        parts = ref.split("/")
        if len(parts) < 2 or (targets and parts[-2] not in targets):
            return None
        return "/".join(parts[-2:])
    if kind == "date":
        return eq_value(value)
    if kind == "string":
        if isinstance(value, dict):
            value = value.get("family") or (value.get("given") or [None])[0] or value.get("text") or value.get("city") \
                or value.get("line", [None])[0]
        return value if isinstance(value, str) else None
    if kind == "uri":
        return value if isinstance(value, str) else None
    return None


class Walk:
    def __init__(self, server, definitions, examples):
        self.server, self.base = server, server.base
        self.package = pathlib.Path(definitions)
        self.examples_dir = pathlib.Path(examples)
        self.definitions = {}
        for f in glob.glob(str(self.package / "SearchParameter-*.json")):
            d = json.load(open(f))
            self.definitions[d["url"]] = d
        # R4's own definitions, for the parameters US Core names only in includes
        self.core = {}
        core = json.load(open(suite.ROOT / "fhir-schemas" / "search-parameters.json"))
        for e in core["entry"]:
            for base in e["resource"].get("base", []):
                self.core[(base, e["resource"]["code"])] = e["resource"]
        self.examples = {}
        self.tokens = {}
        self.system = requests.Session()
        self.system.headers.update({"Authorization": f"Bearer {server.token('system/*.cruds')}",
                                    "Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})

    def load(self):
        for f in sorted(glob.glob(str(self.examples_dir / "*.json"))):
            r = json.load(open(f))
            t, rid = r.get("resourceType"), r.get("id")
            if not t or not rid or t == "Bundle":
                continue
            resp = self.system.put(f"{self.base}/{t}/{rid}", data=json.dumps(r))
            record("load", resp.status_code in (200, 201), f"PUT {t}/{rid} → {resp.status_code}")
            if resp.status_code in (200, 201):
                self.examples.setdefault(t, []).append(r)

    def token_for(self, patient):
        if patient not in self.tokens:
            out = subprocess.run(self.server.args + ["token", "--scope", "patient/*.rs", "--patient", patient,
                                                     "--expires-in", "900"], check=True, capture_output=True, text=True)
            s = requests.Session()
            s.headers.update({"Authorization": f"Bearer {out.stdout.strip()}", "Accept": "application/fhir+json"})
            self.tokens[patient] = s
        return self.tokens[patient]

    def patient_of(self, resource, params):
        """The patient whose app searches for `resource`: its own, else the package's example patient
        (shared resources such as Organization and Practitioner)."""
        if resource["resourceType"] == "Patient":
            return resource["id"]
        for p in params:
            if p["name"] == "patient":
                for v in values(resource, self.definitions.get(p["definition"], {})):
                    ref = search_value(v, "reference", ["Patient"])
                    if ref:
                        return ref.split("/")[1]
        # a type US Core searches without `patient` (Provenance): the patient it references
        found = re.search(r'"reference":\s*"Patient/([A-Za-z0-9.-]+)"', json.dumps(resource))
        return found.group(1) if found else "example"

    def found(self, session, query, rid):
        url = f"{self.base}/{query}"
        ids, status = set(), None
        while url:
            r = session.get(url)
            status = r.status_code
            if status != 200:
                return False, status, set()
            bundle = r.json()
            for e in bundle.get("entry", []):
                ids.add((e["resource"]["resourceType"], e["resource"]["id"], e.get("search", {}).get("mode")))
            url = next((l["url"] for l in bundle.get("link", []) if l["relation"] == "next"), None)
        return any(i[1] == rid for i in ids), status, ids

    def search(self, level, t, names, params, examples):
        """One search (parameter or combination) from each example having values for all of it."""
        by_name = {p["name"]: p for p in params}
        tried = 0
        for r in examples:
            query = []
            for name in names:
                p = by_name.get(name)
                d = self.definitions.get(p["definition"], {}) if p else {}
                v = next(((sv, x) for sv, x in ((search_value(x, d.get("type"), d.get("target", [])), x)
                                                   for x in values(r, d)) if sv), None)
                if v is None:
                    break
                query.append((name, v[0], d, v[1]))
            else:
                tried += 1
                session = self.token_for(self.patient_of(r, params))
                q = "&".join(f"{n}={urllib.parse.quote(v, safe='|/:')}" for n, v, _, _ in query)
                ok, status, _ = self.found(session, f"{t}?{q}&_count=200", r["id"])
                record(level, ok, f"{t}?{q} finds {t}/{r['id']} ({status})")
                for n, v, d, raw in query:
                    self.variants(t, r, session, query, n, v, d, raw)
                if tried >= 3:
                    return
        if tried == 0:
            print(f"  skip [{level}] {t}?{'&'.join(names)}: no example has values for it")

    def variants(self, t, r, session, query, name, value, d, raw):
        """The comparators and multipleOr the SearchParameter marks SHALL, on one parameter."""
        rest = "&".join(f"{n}={urllib.parse.quote(v, safe='|/:')}" for n, v, _, _ in query if n != name)
        rest = f"&{rest}" if rest else ""
        if expectation(d.get("_multipleOr")) == "SHALL":
            q = f"{t}?{name}={urllib.parse.quote(value, safe='|/:')},nomatch-x{rest}&_count=200"
            ok, status, _ = self.found(session, q, r["id"])
            record("SHALL", ok, f"multipleOr {q} finds {t}/{r['id']} ({status})")
        for comparator, ext in zip(d.get("comparator", []), d.get("_comparator", [])):
            if expectation(ext) != "SHALL" or d.get("type") != "date":
                continue
            first, last = date_range(raw)
            day = datetime.timedelta(days=1)
            bound = {"gt": first - 2 * day, "ge": first - day, "lt": last + 2 * day, "le": last + day}.get(comparator)
            if bound is None:
                continue
            bound = bound.isoformat()
            q = f"{t}?{name}={comparator}{bound}{rest}&_count=200"
            ok, status, _ = self.found(session, q, r["id"])
            record("SHALL", ok, f"comparator {q} finds {t}/{r['id']} ({status})")

    def includes(self, t, resource_cs, examples):
        for inc in resource_cs.get("searchInclude", []):
            parts = inc.split(":")
            for r in examples[:3]:
                session = self.token_for(self.patient_of(r, resource_cs.get("searchParam", [])))
                ok, status, ids = self.found(session, f"{t}?_id={r['id']}&_include={inc}", r["id"])
                level = expectation(resource_cs.get("_searchInclude", [{}])[0]) or "SHALL"
                record(level, ok and status == 200, f"{t}?_id={r['id']}&_include={inc} ({status})")
                included = {(a, b) for a, b, m in ids if m == "include"}
                # what the example references through that parameter, where stored and readable
                d = next((self.definitions.get(p["definition"], {}) for p in resource_cs.get("searchParam", [])
                          if p["name"] == parts[1]), self.core.get((t, parts[1])))
                if d is None:
                    continue
                for v in values(r, d):
                    ref = search_value(v, "reference", [parts[2]] if len(parts) > 2 else d.get("target", []))
                    if not ref:
                        continue
                    rt, rid = ref.split("/")
                    if self.system.get(f"{self.base}/{rt}/{rid}").status_code != 200:
                        continue  # the package has no such example
                    # a patient app opens what its records point to (shared practitioners,
                    # medications …), another patient excepted
                    if rt != "Patient" or rid == self.patient_of(r, resource_cs.get("searchParam", [])):
                        status = session.get(f"{self.base}/{rt}/{rid}").status_code
                        record("SHALL", status == 200, f"read {ref}, referenced by {t}/{r['id']}, in the patient's context ({status})")
                        record("SHALL", (rt, rid) in included, f"{t}?_id={r['id']}&_include={inc} includes {ref}")
        for rev in resource_cs.get("searchRevInclude", []):
            src, param = rev.split(":")[:2]
            for r in examples[:3]:
                session = self.token_for(self.patient_of(r, resource_cs.get("searchParam", [])))
                ok, status, ids = self.found(session, f"{t}?_id={r['id']}&_revinclude={rev}", r["id"])
                record("SHALL", ok and status == 200, f"{t}?_id={r['id']}&_revinclude={rev} ({status})")
                # every stored source pointing at the example, readable by the token, comes with it
                for s in self.examples.get(src, []):
                    targets = [x.get("reference", "") for x in (s.get(param) or [])] if isinstance(s.get(param), list) \
                        else [(s.get(param) or {}).get("reference", "")]
                    if f"{t}/{r['id']}" in targets and session.get(f"{self.base}/{src}/{s['id']}").status_code == 200:
                        record("SHALL", (src, s["id"], "include") in ids,
                               f"{t}?_id={r['id']}&_revinclude={rev} includes {src}/{s['id']}")

    def walk(self):
        cs = json.load(open(self.package / "CapabilityStatement-us-core-server.json"))
        for resource_cs in cs["rest"][0]["resource"]:
            t = resource_cs["type"]
            examples = self.examples.get(t, [])
            params = resource_cs.get("searchParam", [])
            if not examples:
                print(f"  skip {t}: the package has no example")
                continue
            # reading each example with its patient's token
            for r in examples[:5]:
                status = self.token_for(self.patient_of(r, params)).get(f"{self.base}/{t}/{r['id']}").status_code
                record("SHALL", status == 200, f"read {t}/{r['id']} in its patient's context ({status})")
            for p in params:
                level = expectation(p)
                if level in ("SHALL", "SHOULD"):
                    self.search(level, t, [p["name"]], params, examples)
            for e in resource_cs.get("extension", []):
                if e.get("url") != COMBINATION:
                    continue
                level = next((x["valueCode"] for x in e["extension"] if x["url"] == EXPECTATION), None)
                names = [x["valueString"] for x in e["extension"] if x["url"] == "required"]
                if level in ("SHALL", "SHOULD"):
                    self.search(level, t, names, params, examples)
            self.includes(t, resource_cs, examples)


def run(binary, definitions, examples, database_url=None):
    config = f'profile_dir = "{suite.ROOT / "profiles"}"\n'
    server = suite.Server(binary, database_url, config=config)
    try:
        walk = Walk(server, definitions, examples)
        walk.load()
        walk.walk()
    finally:
        server.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", required=True)
    ap.add_argument("--definitions", default=str(suite.ROOT / "profiles" / "us-core-6.1.0"))
    ap.add_argument("--examples", default=str(suite.ROOT / "tests" / "data" / "us-core" / "example"))
    ap.add_argument("--backends", default="sqlite,postgres")
    args = ap.parse_args()
    for backend in args.backends.split(","):
        print(f"== US Core 6.1 on {backend}")
        if backend == "sqlite":
            run(args.binary, args.definitions, args.examples)
        else:
            cluster = suite.PgCluster()
            try:
                run(args.binary, args.definitions, args.examples, cluster.url)
            finally:
                cluster.stop()
    print()
    for level in ("load", "SHALL", "SHOULD"):
        print(f"{level:<8}{RESULTS[(level, True)]:>6} passed{RESULTS[(level, False)]:>6} failed")
    for f in FAILURES:
        print(f"  FAIL {f}")
    sys.exit(1 if RESULTS[("SHALL", False)] or RESULTS[("load", False)] else 0)


if __name__ == "__main__":
    main()
