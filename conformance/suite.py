#!/usr/bin/env python3
"""fhirvault's black-box conformance suite: the server driven only over HTTP by software others wrote.

Usage: suite.py --binary target/release/fhirvault --examples DIR [--backends sqlite,postgres]

For each backend it starts the binary (SQLite in a temp data dir; PostgreSQL on a throwaway cluster
started here with the server binaries of PG_BIN or /usr/lib/postgresql/*/bin), gets a token from
`fhirvault token`, and runs the areas below. Every JSON resource or Bundle the server returns is
validated as FHIR R4 (4.0.1) by fhir.resources (PyPI); failures count in the area `r4-validity`.

Areas:
  crud          fhirpy (PyPI): create, read, update, vread, history, delete, conditional create
  search        fhirpy: searches, sorting, _include, counts, paging through every page
  bundles       transaction and batch Bundles (urn:uuid references, conditional references, rollback)
  smart-client  the SMART Python client (fhirclient, PyPI): read and search with its models
  examples      every example of the official R4 examples package (hl7.fhir.r4.examples 4.0.1, npm):
                loaded, read back and compared, ignoring only server-owned meta
  fhirpath      the official FHIRPath Patch cases (FHIR/fhir-test-cases, tests/data/patch), over HTTP PATCH
  smart-launch  the built-in authorization server with clients others wrote: fhirclient (PyPI) completes a
                standalone launch with PKCE (a script plays the browser: login form, TOTP enrolment and code,
                consent with the patient picker) and reads the patient; refresh rotation (a spent refresh
                token revokes its grant) and revocation; a backend service signing its own RS384 and ES384
                assertions with jwcrypto (PyPI) searches, and a replayed assertion is refused
  bulk-data     Bulk Data 2.0 with RS384 and ES384 backend-services clients of its own: token endpoint
                edge cases (invalid_scope, replay, foreign jku), GET and POST kick-offs, patient lists,
                manifests and downloads, cancellation, and each refusal
  external-idp  oidc-provider (npm, a certified OpenID provider) on loopback as fhirvault's external
                issuer (the built-in authorization server off: the SMART configuration and the
                CapabilityStatement name the provider): its client-credentials JWTs are accepted with
                their scopes, and refused when minted for another audience
  validate      every official example (and every conformance resource of the package) through
                `$validate`: no error issues, and every issue with a severity and an expression
  r4-validity   every response validated by fhir.resources

Prints a per-area table and `N passed, N failed`; exits 1 if anything failed.
"""

import argparse
import base64
import copy
import glob
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict

import requests
from fhir.resources import get_fhir_model_class
from fhirclient import client as smart_client
from fhirclient.models.observation import Observation as SmartObservation
from fhirclient.models.patient import Patient as SmartPatient
from fhirpy import SyncFHIRClient
from jwcrypto import jwk as jw_jwk, jwt as jw_jwt
import pyotp

ROOT = pathlib.Path(__file__).resolve().parent.parent
AREAS = ["crud", "search", "bundles", "smart-client", "smart-launch", "bulk-data", "examples", "fhirpath", "validate",
         "external-idp", "r4-validity"]


class Results:
    def __init__(self):
        self.passed = defaultdict(int)
        self.failed = defaultdict(int)
        self.known = defaultdict(int)
        self.failures = defaultdict(list)
        # failures explained in known-failures.json (the data's or a client library's, not the server's)
        self.rules = json.load(open(pathlib.Path(__file__).with_name("known-failures.json")))
        self.rule_hits = defaultdict(int)

    def ok(self, area):
        self.passed[area] += 1

    def fail(self, area, what):
        for i, rule in enumerate(self.rules):
            if rule["area"] == area and re.search(rule["match"], what):
                self.known[area] += 1
                self.rule_hits[i] += 1
                return
        self.failed[area] += 1
        if len(self.failures[area]) < 8 or os.environ.get("SUITE_ALL_FAILURES"):
            self.failures[area].append(what)

    def check(self, area, name, fn):
        try:
            fn()
            self.ok(area)
        except Exception as e:  # a failing check is a result, not the end of the suite
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            self.fail(area, f"{name}: {detail[:300]}")


RESULTS = Results()
BACKEND = {"name": "?"}


def validate_r4(obj):
    """Validates a resource (and, for a Bundle, its entries) as FHIR R4 with fhir.resources."""
    model = get_fhir_model_class(obj["resourceType"])
    model.parse_obj(obj)


_original_send = requests.Session.send


def _validating_send(self, request, **kwargs):
    """Every response the clients receive: a FHIR JSON body must be valid R4."""
    response = _original_send(self, request, **kwargs)
    ctype = response.headers.get("content-type", "")
    if "ndjson" in ctype and response.content:
        # Bulk Data files: one resource per line, each valid R4
        for line in response.text.splitlines():
            if not line:
                continue
            try:
                validate_r4(json.loads(line))
                RESULTS.ok("r4-validity")
            except Exception as e:
                RESULTS.fail("r4-validity", f"{BACKEND['name']} {request.method} {request.path_url[:80]}: {str(e)[:300]}")
        return response
    if "json" in ctype and response.content:
        try:
            body = response.json()
        except ValueError:
            RESULTS.fail("r4-validity", f"{request.method} {request.path_url[:80]}: not JSON")
            return response
        if isinstance(body, dict) and "resourceType" in body:
            try:
                validate_r4(body)
                RESULTS.ok("r4-validity")
            except Exception as e:
                RESULTS.fail("r4-validity", f"{BACKEND['name']} {request.method} {request.path_url[:80]}: {str(e)[:300]}")
    return response


requests.Session.send = _validating_send


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def is_root():
    return os.geteuid() == 0


def as_postgres(cmd):
    return (["runuser", "-u", "postgres", "--"] + cmd) if is_root() else cmd


class PgCluster:
    """A throwaway PostgreSQL cluster on a loopback port, removed on stop."""

    def __init__(self):
        bins = os.environ.get("PG_BIN") or sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
        self.bin = pathlib.Path(bins)
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="fhirvault-conformance-pg-"))
        if is_root():
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        subprocess.run(
            as_postgres([str(self.bin / "initdb"), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "-D", str(self.data)]),
            check=True,
            capture_output=True,
        )
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=200"
        subprocess.run(
            as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start"]),
            check=True,
            capture_output=True,
        )
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self):
        subprocess.run(as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(url, tries):
    """Whether `url` answers 200 within `tries` tenths of a second."""
    for _ in range(tries):
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.1)
    return False


class Server:
    def __init__(self, binary, database_url=None, config=None):
        self.dir = tempfile.mkdtemp(prefix="fhirvault-conformance-")
        self.port = free_port()
        self.args = [binary, "--data-dir", self.dir]
        if database_url:
            self.args += ["--database-url", database_url]
        self.log = open(os.path.join(self.dir, "server.log"), "w")
        # the official examples include a 17 MB Bundle: the body limit is raised for them
        env = dict(os.environ, FHIRVAULT_MAX_BODY_BYTES=str(64 * 1024 * 1024))
        serve = ["serve", "--listen", f"127.0.0.1:{self.port}"]
        if config:
            path = os.path.join(self.dir, "fhirvault.toml")
            with open(path, "w") as f:
                f.write(config)
            serve += ["--config", path]
        self.proc = subprocess.Popen(self.args + serve, stdout=self.log, stderr=self.log, env=env)
        self.root = f"http://127.0.0.1:{self.port}"
        self.base = f"{self.root}/fhir"
        if not wait_for(f"{self.root}/healthz", tries=300):
            raise RuntimeError("the server did not start: " + open(os.path.join(self.dir, "server.log")).read()[-2000:])

    def token(self, scope):
        # an administrator's: the examples include SearchParameter resources, which only admins write
        out = subprocess.run(self.args + ["token", "--scope", scope, "--expires-in", "900", "--role", "admin"],
                             check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def admin(self, *args, stdin=None):
        out = subprocess.run(self.args + ["admin", *args], check=True, capture_output=True, text=True, input=stdin)
        return out.stdout

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def session(token):
    s = requests.Session()
    s.headers.update({"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"})
    return s


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


# ---- areas -------------------------------------------------------------------------------------


def area_crud(base, token):
    client = SyncFHIRClient(base, authorization=f"Bearer {token}")
    state = {}

    def create():
        p = client.resource("Patient", name=[{"family": "Conformance", "given": ["Crud"]}], gender="female", birthDate="1971-02-03")
        p.save()
        expect(p.id and p["meta"]["versionId"] == "1", "created with id and version 1")
        state["p"] = p

    def read():
        again = client.reference("Patient", state["p"].id).to_resource()
        expect(again["name"][0]["family"] == "Conformance", "read back")

    def update():
        p = state["p"]
        p["active"] = True
        p.save()
        expect(p["meta"]["versionId"] == "2", "version 2 after update")

    def vread():
        r = requests.Session().get(f"{base}/Patient/{state['p'].id}/_history/1", headers={"Authorization": f"Bearer {token}"})
        expect(r.status_code == 200 and "active" not in r.json(), "version 1 as it was")

    def history():
        r = session(token).get(f"{base}/Patient/{state['p'].id}/_history")
        expect(r.json()["type"] == "history" and len(r.json()["entry"]) == 2, "two versions in history")

    def delete():
        state["p"].delete()
        r = session(token).get(f"{base}/Patient/{state['p'].id}")
        expect(r.status_code == 410, f"410 after delete, got {r.status_code}")

    def conditional_create():
        s = session(token)
        body = {"resourceType": "Patient", "identifier": [{"system": "urn:conformance", "value": "cc-1"}]}
        h = {"If-None-Exist": "identifier=urn:conformance|cc-1", "Content-Type": "application/fhir+json"}
        first = s.post(f"{base}/Patient", json=body, headers=h)
        second = s.post(f"{base}/Patient", json=body, headers=h)
        expect(first.status_code == 201 and second.status_code == 200, f"{first.status_code} then {second.status_code}")
        expect(first.json()["id"] == second.json()["id"], "the same resource")

    for name, fn in [("create", create), ("read", read), ("update", update), ("vread", vread), ("history", history),
                     ("delete", delete), ("conditional create", conditional_create)]:
        RESULTS.check("crud", name, fn)


def area_search(base, token):
    client = SyncFHIRClient(base, authorization=f"Bearer {token}")
    patient = client.resource("Patient", name=[{"family": "Searchable", "given": ["Paging"]}], birthDate="1980-05-06")
    patient.save()
    for i in range(23):
        client.resource(
            "Observation",
            status="final",
            code={"coding": [{"system": "http://loinc.org", "code": "8867-4" if i % 2 else "8310-5"}]},
            subject={"reference": f"Patient/{patient.id}"},
            effectiveDateTime=f"2021-03-{i + 1:02d}T10:00:00Z",
            valueQuantity={"value": 60 + i, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
        ).save()
    obs = client.resources("Observation").search(subject=f"Patient/{patient.id}")

    def paging():
        everything = obs.limit(5).fetch_all()
        expect(len(everything) == 23, f"23 over five-entry pages, got {len(everything)}")
        expect(len({o.id for o in everything}) == 23, "no duplicates across pages")

    def count():
        expect(obs.count() == 23, "count")

    def token_search():
        n = len(client.resources("Observation").search(subject=f"Patient/{patient.id}", code="http://loinc.org|8867-4").fetch_all())
        expect(n == 11, f"11 with that code, got {n}")

    def date_prefix():
        n = len(obs.search(date="ge2021-03-20").fetch_all())
        expect(n == 4, f"4 from the 20th, got {n}")

    def sort():
        got = [o["effectiveDateTime"] for o in obs.sort("-date").limit(3).fetch()]
        expect(got == sorted(got, reverse=True) and got[0].startswith("2021-03-23"), f"newest first: {got}")

    def include():
        r = session(token).get(f"{base}/Observation", params={"subject": f"Patient/{patient.id}", "_include": "Observation:subject", "_count": 2})
        kinds = [e["search"]["mode"] for e in r.json()["entry"]]
        expect(kinds.count("include") == 1 and kinds.count("match") == 2, f"two matches and the patient: {kinds}")

    def string_search():
        found = client.resources("Patient").search(family="searchab").fetch_all()
        expect(any(p.id == patient.id for p in found), "prefix match on family")

    def quantity():
        n = len(obs.search(**{"value-quantity": "gt80"}).fetch_all())
        expect(n == 2, f"2 above 80, got {n}")

    for name, fn in [("paging", paging), ("count", count), ("token", token_search), ("date prefix", date_prefix), ("sort", sort),
                     ("_include", include), ("string", string_search), ("quantity", quantity)]:
        RESULTS.check("search", name, fn)


def area_bundles(base, token):
    s = session(token)

    def transaction():
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a", "resource": {"resourceType": "Patient", "name": [{"family": "Bundled"}]},
             "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059",
             "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                          "subject": {"reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"}},
             "request": {"method": "POST", "url": "Observation"}},
        ]}
        r = s.post(base, json=bundle, headers={"Content-Type": "application/fhir+json"})
        expect(r.status_code == 200, f"status {r.status_code}")
        entries = r.json()["entry"]
        expect([e["response"]["status"][:3] for e in entries] == ["201", "201"], "both created")
        pid = entries[0]["response"]["location"].split("/")[1]
        oid = entries[1]["response"]["location"].split("/")[1]
        o = s.get(f"{base}/Observation/{oid}").json()
        expect(o["subject"]["reference"] == f"Patient/{pid}", "the reference points at the new patient")

    def rollback():
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Patient", "name": [{"family": "NeverStored"}]}, "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Observation", "status": 12}, "request": {"method": "POST", "url": "Observation"}},
        ]}
        r = s.post(base, json=bundle, headers={"Content-Type": "application/fhir+json"})
        expect(r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome", f"400, got {r.status_code}")
        found = s.get(f"{base}/Patient", params={"family": "NeverStored"}).json()
        expect(not found.get("entry"), "nothing stored")

    def batch():
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": {"resourceType": "Patient", "name": [{"family": "Batched"}]}, "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
        ]}
        r = s.post(base, json=bundle, headers={"Content-Type": "application/fhir+json"})
        codes = [e["response"]["status"][:3] for e in r.json()["entry"]]
        expect(codes == ["201", "404"], f"{codes}")

    def synthea():
        path = ROOT.parent / "shared" / "testdata" / "synthea-r4-60-patients.tgz"
        if not path.exists():
            raise AssertionError(f"{path} missing")
        import tarfile
        with tarfile.open(path) as t:
            member = sorted((m for m in t.getmembers() if m.isfile()), key=lambda m: m.name)[0]
            bundle = json.load(t.extractfile(member))
        r = s.post(base, json=bundle, headers={"Content-Type": "application/fhir+json"})
        expect(r.status_code == 200, f"a Synthea patient as one transaction: {r.status_code} {r.text[:300]}")
        expect(len(r.json()["entry"]) == len(bundle["entry"]), "an answer per entry")

    for name, fn in [("transaction", transaction), ("rollback", rollback), ("batch", batch), ("synthea transaction", synthea)]:
        RESULTS.check("bundles", name, fn)


def area_smart_client(base, token):
    smart = smart_client.FHIRClient(settings={"app_id": "fhirvault-conformance", "api_base": base})
    smart.server.session.headers.update({"Authorization": f"Bearer {token}"})
    state = {}

    def create_and_read():
        p = SmartPatient({"name": [{"family": "SmartClient"}], "gender": "male"})
        created = p.create(smart.server)
        pid = created["id"] if isinstance(created, dict) and "id" in created else None
        if pid is None:
            found = SmartPatient.where(struct={"family": "SmartClient"}).perform_resources(smart.server)
            pid = found[0].id
        again = SmartPatient.read(pid, smart.server)
        expect(again.name[0].family == "SmartClient", "read with the client's models")
        state["pid"] = pid

    def search():
        o = SmartObservation({"status": "final", "code": {"text": "smart"}, "subject": {"reference": f"Patient/{state['pid']}"}})
        o.create(smart.server)
        found = SmartObservation.where(struct={"subject": f"Patient/{state['pid']}"}).perform_resources(smart.server)
        expect(len(found) == 1 and found[0].code.text == "smart", "found with the client's search")

    def capabilities():
        r = requests.get(f"{base}/metadata")
        expect(r.json()["fhirVersion"] == "4.0.1", "R4")

    for name, fn in [("create and read", create_and_read), ("search", search), ("capabilities", capabilities)]:
        RESULTS.check("smart-client", name, fn)


SERVER_META = ("versionId", "lastUpdated")


def comparable(resource):
    r = copy.deepcopy(resource)
    meta = r.get("meta", {})
    for k in SERVER_META:
        meta.pop(k, None)
    if not meta:
        r.pop("meta", None)
    return r


def area_examples(base, token, examples_dir):
    s = session(token)
    files = sorted(glob.glob(os.path.join(examples_dir, "*.json")))
    for path in files:
        try:
            resource = json.load(open(path))
        except ValueError:
            continue
        if not isinstance(resource, dict) or "resourceType" not in resource or resource.get("resourceType") == "AuditEvent":
            continue
        name = os.path.basename(path)

        large = os.path.getsize(path) > 1_000_000

        def load_and_compare(resource=resource, name=name, large=large):
            t, rid = resource["resourceType"], resource.get("id")
            headers = {"Content-Type": "application/fhir+json"}
            if large:
                # reading and serializing a file of tens of MB can outlast the server's keep-alive
                # on a slow machine: a pooled connection the server has closed would then fail
                # the request ("Remote end closed connection without response"), so open a new one
                s.close()
            if rid:
                r = s.put(f"{base}/{t}/{rid}", data=json.dumps(resource), headers=headers)
            else:
                r = s.post(f"{base}/{t}", data=json.dumps(resource), headers=headers)
            expect(r.status_code in (200, 201), f"stored: {r.status_code} {r.text[:300]}")
            stored_id = r.json()["id"]
            back = s.get(f"{base}/{t}/{stored_id}").json()
            sent = comparable(resource)
            got = comparable(back)
            if not rid:
                got.pop("id", None)
            expect(got == sent, "read back differs from what was sent")

        RESULTS.check("examples", name, load_and_compare)


def area_validate(base, token, examples_dir):
    s = session(token)
    for path in sorted(glob.glob(os.path.join(examples_dir, "*.json"))):
        name = os.path.basename(path)
        # the package's large aggregate Bundles are the definitions themselves
        if name.startswith("Bundle-") and os.path.getsize(path) > 1_000_000:
            continue
        try:
            resource = json.load(open(path))
        except ValueError:
            continue
        if not isinstance(resource, dict) or "resourceType" not in resource or resource["resourceType"] == "AuditEvent":
            continue

        def run(resource=resource):
            t = resource["resourceType"]
            r = s.post(f"{base}/{t}/$validate", data=json.dumps(resource),
                       headers={"Content-Type": "application/fhir+json"})
            expect(r.status_code == 200, f"status {r.status_code} {r.text[:300]}")
            oo = r.json()
            expect(oo["resourceType"] == "OperationOutcome", "not an OperationOutcome")
            errors = [i for i in oo["issue"] if i["severity"] in ("error", "fatal")]
            for i in oo["issue"]:
                expect(i["severity"] == "information" or i.get("expression"), f"an issue without expression: {i}")
            expect(not errors, "errors: " + "; ".join(f"{i.get('expression')} {i.get('diagnostics')}" for i in errors[:5]))

        RESULTS.check("validate", name, run)


def area_external_idp(binary):
    """oidc-provider as the external issuer of a fhirvault of its own (SQLite)."""
    port = free_port()
    script = ROOT / "conformance" / "external-idp" / "provider.mjs"
    log = tempfile.NamedTemporaryFile(prefix="oidc-provider-", suffix=".log", delete=False)
    provider = subprocess.Popen(["node", str(script), str(port)], stdout=log, stderr=log)
    issuer = f"http://127.0.0.1:{port}"
    audience = "urn:fhirvault:conformance"
    server = None
    try:
        if not wait_for(f"{issuer}/.well-known/openid-configuration", tries=100):
            raise RuntimeError("oidc-provider did not start")
        # the provider signs users in: the built-in authorization server is turned off
        server = Server(binary, config=f'auth_server = false\n[[oidc_provider]]\nissuer = "{issuer}"\naudience = "{audience}"\n')
        base = server.base

        def token(scope, resource=audience):
            r = requests.post(f"{issuer}/token", auth=("suite-backend", "suite-backend-secret-not-for-production"),
                              data={"grant_type": "client_credentials", "scope": scope, "resource": resource})
            expect(r.status_code == 200, f"provider token: {r.status_code} {r.text[:200]}")
            return r.json()["access_token"]

        def accepted_with_its_scopes():
            s = session(token("system/*.rs"))
            r = s.get(f"{base}/Patient")
            expect(r.status_code == 200, f"search with the provider's token: {r.status_code} {r.text[:200]}")
            expect(r.json()["resourceType"] == "Bundle", "a Bundle")
            # read-only scopes: a write is refused
            r = s.post(f"{base}/Patient", data=json.dumps({"resourceType": "Patient"}),
                       headers={"Content-Type": "application/fhir+json"})
            expect(r.status_code == 403, f"create with system/*.rs: {r.status_code}")

        def narrower_scope():
            s = session(token("system/Observation.rs"))
            expect(s.get(f"{base}/Observation").status_code == 200, "Observation with system/Observation.rs")
            expect(s.get(f"{base}/Patient").status_code == 403, "Patient with system/Observation.rs")

        def wrong_audience_refused():
            s = session(token("system/*.rs", resource="urn:another:api"))
            r = s.get(f"{base}/Patient")
            expect(r.status_code == 401, f"a token for another audience: {r.status_code}")
            expect("invalid_token" in r.headers.get("WWW-Authenticate", ""), "WWW-Authenticate names invalid_token")

        def tampered_refused():
            t = token("system/*.rs")
            head, body, sig = t.split(".")
            claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            claims["scope"] = "system/*.cruds"
            forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
            r = session(f"{head}.{forged}.{sig}").get(f"{base}/Patient")
            expect(r.status_code == 401, f"a token with an edited payload: {r.status_code}")

        def advertised_instead_of_the_built_in_server():
            provider_meta = requests.get(f"{issuer}/.well-known/openid-configuration").json()
            smart = requests.get(f"{base}/.well-known/smart-configuration").json()
            expect(smart["token_endpoint"] == provider_meta["token_endpoint"], f"token endpoint {smart.get('token_endpoint')}")
            expect(smart["issuer"] == issuer, "the provider is the issuer")
            expect(requests.get(f"{server.root}/auth/authorize").status_code == 404, "no built-in /auth/authorize")
            cs = requests.get(f"{base}/metadata").json()
            uris = {e["url"]: e["valueUri"] for e in cs["rest"][0]["security"]["extension"][0]["extension"]}
            expect(uris.get("token") == provider_meta["token_endpoint"], f"CapabilityStatement oauth-uris {uris}")

        RESULTS.check("external-idp", "advertised instead of the built-in server", advertised_instead_of_the_built_in_server)
        RESULTS.check("external-idp", "accepted with its scopes", accepted_with_its_scopes)
        RESULTS.check("external-idp", "narrower scope", narrower_scope)
        RESULTS.check("external-idp", "wrong audience refused", wrong_audience_refused)
        RESULTS.check("external-idp", "tampered token refused", tampered_refused)
    except Exception as e:  # the provider or the server did not start
        RESULTS.fail("external-idp", f"setup: {e}; provider log: {open(log.name).read()[-500:]}")
    finally:
        if server:
            server.stop()
        provider.terminate()
        provider.wait(timeout=10)


def hidden_fields(html):
    return {m.group(1): m.group(2).replace("&amp;", "&").replace("&quot;", '"')
            for m in re.finditer(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', html)}


def area_smart_launch(server, token):
    """fhirclient's standalone launch against the built-in authorization server, backend services."""
    base, root = server.base, server.root
    redirect = "http://127.0.0.1:9/smart-callback"
    server.admin("client", "add", "suite-smart-app", "--name", "Suite SMART app", "--redirect-uri", redirect,
                 "--scope", "launch/patient openid fhirUser offline_access patient/*.rs user/Patient.rs")
    password = "suite-password-" + os.urandom(6).hex()
    server.admin("user", "add", "suite-doctor", "--fhir-user", "Practitioner/suite-doctor", "--password-stdin",
                 stdin=password + "\n")
    admin = session(token)
    family = "Launchpatient" + os.urandom(3).hex()
    pid = admin.post(f"{base}/Patient", data=json.dumps({"resourceType": "Patient", "name": [{"family": family, "given": ["Ada"]}]}),
                     headers={"Content-Type": "application/fhir+json"}).json()["id"]
    state = {}

    def standalone_launch():
        settings = {"app_id": "suite-smart-app", "api_base": base, "redirect_uri": redirect,
                    "scope": "launch/patient openid fhirUser offline_access patient/*.rs user/Patient.rs"}
        smart = smart_client.FHIRClient(settings=settings)
        url = smart.authorize_url
        expect(url.startswith(f"{root}/auth/authorize") and "code_challenge_method=S256" in url, f"authorize URL {url[:80]}")
        browser = requests.Session()
        page = browser.get(url)
        expect(page.status_code == 200 and 'name="username"' in page.text, f"login page: {page.status_code}")
        page = browser.post(f"{root}/auth/login", data={**hidden_fields(page.text), "username": "suite-doctor", "password": password})
        expect(page.status_code == 200 and "/auth/mfa/enrol" in page.text, f"enrolment page: {page.status_code}")
        secret = re.search(r'<code class="secret"[^>]*>([A-Z2-7 ]+)</code>', page.text).group(1).replace(" ", "")
        totp = pyotp.TOTP(secret)
        page = browser.post(f"{root}/auth/mfa/enrol", data={**hidden_fields(page.text), "code": totp.now()})
        expect(page.status_code == 200 and "Allow access" in page.text, f"consent page: {page.status_code} {page.text[:200]}")
        fields = hidden_fields(page.text)
        picked = browser.get(f"{root}/auth/consent", params={"request": fields["request"], "q": family})
        choice = re.search(r'name="patient" value="([^"]+)"', picked.text)
        expect(choice and choice.group(1) == pid, "the picker finds the patient by name")
        done = browser.post(f"{root}/auth/consent", data={**hidden_fields(picked.text), "decision": "allow", "patient": pid},
                            allow_redirects=False)
        expect(done.status_code == 303, f"consent redirects: {done.status_code}")
        smart.handle_callback(done.headers["Location"])
        expect(smart.patient_id == pid, f"launch patient {smart.patient_id}")
        patient = SmartPatient.read(pid, smart.server)
        expect(patient.name[0].family == family, "the patient read through fhirclient")
        obs = SmartObservation.where({"patient": pid}).perform_resources(smart.server)
        expect(obs == [], "a search in the patient's compartment")
        state.update(smart=smart, totp=totp, browser=browser)

    def second_sign_in_asks_the_code():
        browser = requests.Session()
        smart = smart_client.FHIRClient(settings={"app_id": "suite-smart-app", "api_base": base, "redirect_uri": redirect,
                                                  "scope": "openid fhirUser user/Patient.rs"})
        page = browser.get(smart.authorize_url)
        page = browser.post(f"{root}/auth/login", data={**hidden_fields(page.text), "username": "suite-doctor", "password": password})
        expect('action="/auth/mfa"' in page.text, "the code page for an enrolled user")
        fields = hidden_fields(page.text)
        wrong = browser.post(f"{root}/auth/mfa", data={**fields, "code": "000000" if state["totp"].now() != "000000" else "111111"})
        expect(wrong.status_code == 401, f"a wrong code: {wrong.status_code}")
        # the enrolment used this step's code: the next step's is accepted, never the same twice
        page = browser.post(f"{root}/auth/mfa", data={**fields, "code": state["totp"].at(time.time() + 30)})
        expect("Allow access" in page.text, f"consent after the code: {page.status_code}")
        # fhirclient adds launch/patient to a standalone launch: the user picks the patient
        done = browser.post(f"{root}/auth/consent", data={**hidden_fields(page.text), "decision": "allow", "patient": pid},
                            allow_redirects=False)
        expect(done.status_code == 303, f"consent: {done.status_code} {done.text[:300]}")
        smart.handle_callback(done.headers["Location"])
        r = session(smart.server.auth.access_token).get(f"{base}/Patient/{pid}")
        expect(r.status_code == 200, f"user-level read: {r.status_code}")

    def refresh_and_revoke():
        smart = state["smart"]
        spent = smart.server.auth.refresh_token
        smart.reauthorize()
        expect(smart.server.auth.refresh_token != spent, "the refresh token rotates")
        r = session(smart.server.auth.access_token).get(f"{base}/Patient/{pid}")
        expect(r.status_code == 200, f"read with the refreshed token: {r.status_code}")
        current = smart.server.auth.refresh_token
        r = requests.post(f"{root}/auth/revoke", data={"token": current, "client_id": "suite-smart-app"})
        expect(r.status_code == 200, f"revoke: {r.status_code}")
        r = requests.post(f"{root}/auth/token", data={"grant_type": "refresh_token", "refresh_token": current,
                                                     "client_id": "suite-smart-app"})
        expect(r.status_code == 400 and r.json()["error"] == "invalid_grant", f"refresh after revocation: {r.status_code}")
        access = smart.server.auth.access_token
        requests.post(f"{root}/auth/revoke", data={"token": access, "client_id": "suite-smart-app"})
        r = session(access).get(f"{base}/Patient/{pid}")
        expect(r.status_code == 401, f"a revoked access token: {r.status_code}")

    def backend_services():
        token_url = f"{root}/auth/token"
        for alg, key in (("RS384", jw_jwk.JWK.generate(kty="RSA", size=2048)),
                         ("ES384", jw_jwk.JWK.generate(kty="EC", crv="P-384"))):
            cid = f"suite-backend-{alg.lower()}"
            key["kid"] = key.thumbprint()
            jwks = os.path.join(server.dir, f"{cid}.jwks.json")
            with open(jwks, "w") as f:
                f.write(json.dumps({"keys": [json.loads(key.export_public())]}))
            server.admin("client", "add", cid, "--type", "confidential", "--jwks", jwks, "--scope", "system/Patient.rs")

            def assertion():
                now = int(time.time())
                t = jw_jwt.JWT(header={"alg": alg, "kid": key["kid"], "typ": "JWT"},
                               claims={"iss": cid, "sub": cid, "aud": token_url, "exp": now + 240,
                                       "jti": os.urandom(12).hex()})
                t.make_signed_token(key)
                return t.serialize()

            signed = assertion()
            form = {"grant_type": "client_credentials", "scope": "system/Patient.rs",
                    "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    "client_assertion": signed}
            r = requests.post(token_url, data=form)
            expect(r.status_code == 200, f"{alg} client credentials: {r.status_code} {r.text[:200]}")
            found = session(r.json()["access_token"]).get(f"{base}/Patient", params={"family": family}).json()
            expect(found.get("total") == 1 or len(found.get("entry", [])) == 1, f"{alg} backend search")
            replay = requests.post(token_url, data=form)
            expect(replay.status_code == 401 and replay.json()["error"] == "invalid_client", f"{alg} replay: {replay.status_code}")

    RESULTS.check("smart-launch", "fhirclient standalone launch (PKCE, TOTP enrolment, picker)", standalone_launch)
    if "smart" in state:
        RESULTS.check("smart-launch", "second sign-in asks the TOTP code", second_sign_in_asks_the_code)
        RESULTS.check("smart-launch", "refresh rotation and revocation", refresh_and_revoke)
    RESULTS.check("smart-launch", "backend services RS384 and ES384 (jwcrypto)", backend_services)


def area_bulk_data(server, token):
    """Bulk Data 2.0 with backend-services clients of its own (private_key_jwt, RS384 and ES384):
    the token endpoint's edge cases, then GET and POST kick-offs at every level, polling, the
    manifest, downloads, cancellation, and each refusal."""
    base, root = server.base, server.root
    token_url = f"{root}/auth/token"
    admin = session(token)
    family = "Bulkfam" + os.urandom(4).hex()
    pids = []
    for i in range(3):
        r = admin.post(f"{base}/Patient", json={"resourceType": "Patient", "name": [{"family": f"{family}{i}"}]})
        pids.append(r.json()["id"])
        admin.post(f"{base}/Observation", json={"resourceType": "Observation", "status": "final",
                                                "code": {"text": "bulk"}, "subject": {"reference": f"Patient/{pids[-1]}"}})
    group = admin.post(f"{base}/Group", json={"resourceType": "Group", "type": "person", "actual": True,
                                              "member": [{"entity": {"reference": f"Patient/{p}"}} for p in pids[:2]]}).json()["id"]

    for alg, key in (("RS384", jw_jwk.JWK.generate(kty="RSA", size=2048)),
                     ("ES384", jw_jwk.JWK.generate(kty="EC", crv="P-384"))):
        cid = f"suite-bulk-{alg.lower()}"
        key["kid"] = key.thumbprint()
        jwks = os.path.join(server.dir, f"{cid}.jwks.json")
        with open(jwks, "w") as f:
            f.write(json.dumps({"keys": [json.loads(key.export_public())]}))
        server.admin("client", "add", cid, "--type", "confidential", "--jwks", jwks,
                     "--scope", "system/Patient.rs system/Observation.rs system/Group.rs system/Provenance.rs")

        def assertion(header_extra=None):
            now = int(time.time())
            header = {"alg": alg, "kid": key["kid"], "typ": "JWT"}
            header.update(header_extra or {})
            t = jw_jwt.JWT(header=header, claims={"iss": cid, "sub": cid, "aud": token_url, "exp": now + 240,
                                                  "jti": os.urandom(12).hex()})
            t.make_signed_token(key)
            return t.serialize()

        def grant(scope, signed=None):
            return requests.post(token_url, data={
                "grant_type": "client_credentials", "scope": scope,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": signed or assertion()})

        def token_edges(alg=alg):
            for scope in ("system/Patient.rs system/Nosuchtype.rs", "system/Patient.cud"):
                r = grant(scope)
                expect(r.status_code == 400 and r.json()["error"] == "invalid_scope", f"{alg} {scope}: {r.status_code}")
            signed = assertion()
            expect(grant("system/Patient.write", signed).json().get("error") == "invalid_scope", "unregistered write")
            expect(grant("system/Patient.rs", signed).status_code == 200, "the assertion survives a refused scope")
            r = grant("system/Patient.rs", signed)
            expect(r.status_code == 401 and r.json()["error"] == "invalid_client", f"{alg} replay: {r.status_code}")
            r = grant("system/Patient.rs", assertion({"jku": "http://127.0.0.1:9/keys.json"}))
            expect(r.status_code == 401 and r.json()["error"] == "invalid_client", f"{alg} foreign jku: {r.status_code}")

        RESULTS.check("bulk-data", f"{alg} token endpoint: invalid_scope, replay, jku", token_edges)
        access = grant("system/Patient.rs system/Observation.rs system/Group.rs").json()["access_token"]
        bulk = session(access)
        kick = {"Prefer": "respond-async", "Accept": "application/fhir+json"}

        def run(r):
            expect(r.status_code == 202, f"kick-off: {r.status_code} {r.text[:200]}")
            status = r.headers["Content-Location"]
            for _ in range(300):
                s = bulk.get(status)
                if s.status_code != 202:
                    break
                time.sleep(0.1)
            expect(s.status_code == 200, f"manifest: {s.status_code}")
            manifest = s.json()
            expect(manifest["requiresAccessToken"] is True and "transactionTime" in manifest, "manifest fields")
            found = {}
            for out in manifest["output"]:
                d = bulk.get(out["url"], headers={"Accept": "application/fhir+ndjson"})
                expect(d.status_code == 200, f"download: {d.status_code}")
                lines = [json.loads(x) for x in d.text.splitlines() if x]
                expect(len(lines) == out["count"], "count matches the lines")
                found.setdefault(out["type"], set()).update(x["id"] for x in lines)
            return status, found

        def get_levels():
            _, found = run(bulk.get(f"{base}/$export", params={"_type": "Patient,Observation"}, headers=kick))
            expect(set(pids) <= found.get("Patient", set()), "system level: every patient")
            _, found = run(bulk.get(f"{base}/Group/{group}/$export", params={"_type": "Patient"}, headers=kick))
            expect(found.get("Patient", set()) == set(pids[:2]), "group level: its members")

        def post_with_patients():
            params = {"resourceType": "Parameters", "parameter": [
                {"name": "_type", "valueString": "Patient"},
                {"name": "_type", "valueString": "Observation"},
                {"name": "patient", "valueReference": {"reference": f"Patient/{pids[2]}"}}]}
            status, found = run(bulk.post(f"{base}/Patient/$export", json=params,
                                          headers={**kick, "Content-Type": "application/fhir+json"}))
            expect(found.get("Patient") == {pids[2]}, "patient list")
            expect(len(found.get("Observation", set())) == 1, "the patient's observation")
            expect(bulk.delete(status).status_code == 202, "cancel")
            gone = bulk.get(status)
            expect(gone.status_code == 404 and gone.json()["resourceType"] == "OperationOutcome", "404 after delete")

        def refusals():
            cases = [
                ("no respond-async", bulk.get(f"{base}/$export", headers={"Accept": "application/fhir+json"})),
                ("no Accept", bulk.get(f"{base}/$export", headers={"Prefer": "respond-async", "Accept": None})),
                ("_since in the future", bulk.get(f"{base}/$export", params={"_since": "2999-01-01T00:00:00Z"}, headers=kick)),
                ("unsupported parameter", bulk.get(f"{base}/$export", params={"_nonsense": "1"}, headers=kick)),
                ("patient at system level", bulk.post(f"{base}/$export", json={"resourceType": "Parameters", "parameter": [
                    {"name": "patient", "valueReference": {"reference": f"Patient/{pids[0]}"}}]},
                    headers={**kick, "Content-Type": "application/fhir+json"})),
                ("a patient outside the group", bulk.post(f"{base}/Group/{group}/$export", json={"resourceType": "Parameters",
                    "parameter": [{"name": "patient", "valueReference": {"reference": f"Patient/{pids[2]}"}}]},
                    headers={**kick, "Content-Type": "application/fhir+json"})),
            ]
            for what, r in cases:
                expect(r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome", f"{what}: {r.status_code}")
            r = bulk.get(f"{base}/$export", params={"_type": "Practitioner"}, headers=kick)
            expect(r.status_code == 403, f"a type the token may not read: {r.status_code}")
            r = bulk.get(f"{base}/$export", params={"_type": "Patient", "includeAssociatedData": "CustomValue"},
                         headers=kick)
            expect(r.status_code == 400, f"an includeAssociatedData value not defined: {r.status_code}")
            r = bulk.get(f"{base}/$export", params={"_type": "Patient",
                                                    "includeAssociatedData": "RelevantProvenanceResources"},
                         headers=kick)
            expect(r.status_code == 403, f"associated Provenance without reading it: {r.status_code}")

        def associated_provenance():
            prov = admin.post(f"{base}/Provenance", json={
                "resourceType": "Provenance", "recorded": "2024-01-01T00:00:00Z",
                "target": [{"reference": f"Patient/{pids[0]}"}],
                "agent": [{"who": {"display": "suite"}}]}).json()["id"]
            reader = session(grant("system/Patient.rs system/Group.rs system/Provenance.rs").json()["access_token"])
            r = reader.get(f"{base}/Group/{group}/$export", headers=kick,
                           params={"_type": "Patient", "includeAssociatedData": "RelevantProvenanceResources"})
            expect(r.status_code == 202, f"kick-off: {r.status_code} {r.text[:200]}")
            status = r.headers["Content-Location"]
            for _ in range(300):
                m = reader.get(status)
                if m.status_code != 202:
                    break
                time.sleep(0.1)
            expect(m.status_code == 200, f"manifest: {m.status_code}")
            outs = [o for o in m.json()["output"] if o["type"] == "Provenance"]
            ids = set()
            for o in outs:
                ids.update(json.loads(x)["id"] for x in reader.get(o["url"], headers={"Accept": "application/fhir+ndjson"}).text.splitlines() if x)
            expect(prov in ids, "the member's Provenance is exported")

        RESULTS.check("bulk-data", f"{alg} GET kick-offs (system, Group)", get_levels)
        RESULTS.check("bulk-data", f"{alg} POST kick-off with patient, cancel, 404 after", post_with_patients)
        RESULTS.check("bulk-data", f"{alg} refusals", refusals)
        RESULTS.check("bulk-data", f"{alg} includeAssociatedData (Provenance)", associated_provenance)


def area_fhirpath(base, token):
    s = session(token)
    cases = json.load(open(ROOT / "tests" / "data" / "patch" / "fhir-patch-tests.json"))
    for i, case in enumerate(cases):
        def run(case=case, i=i):
            resource = copy.deepcopy(case["input"])
            rid = f"fp-case-{i}"
            resource["id"] = rid
            t = resource["resourceType"]
            r = s.put(f"{base}/{t}/{rid}", data=json.dumps(resource), headers={"Content-Type": "application/fhir+json"})
            expect(r.status_code in (200, 201), f"input stored: {r.status_code} {r.text[:200]}")
            p = s.patch(f"{base}/{t}/{rid}", data=json.dumps(case["diff"]), headers={"Content-Type": "application/fhir+json"})
            if "output" not in case:
                expect(p.status_code in (400, 422), f"refused, got {p.status_code}")
                return
            expect(p.status_code == 200, f"patched: {p.status_code} {p.text[:300]}")
            expected = comparable(case["output"])
            expected["id"] = rid
            got = comparable(s.get(f"{base}/{t}/{rid}").json())
            expect(got == expected, f"result differs: {json.dumps(got)[:200]}")

        RESULTS.check("fhirpath", case["name"], run)


def run_backend(name, binary, examples_dir, database_url=None):
    BACKEND["name"] = name
    # the official Subscription examples ask for whole resources; their endpoint is on the
    # internet, so this server delivers nothing (no workers)
    server = Server(binary, database_url, config="subscription_full_resource = true\nsubscription_workers = 0\n")
    try:
        token = server.token("system/*.cruds")
        area_crud(server.base, token)
        area_search(server.base, token)
        area_bundles(server.base, token)
        area_smart_client(server.base, token)
        area_smart_launch(server, token)
        area_bulk_data(server, token)
        area_fhirpath(server.base, token)
        area_examples(server.base, token, examples_dir)
        if name == "sqlite":
            # neither touches the database: once is enough
            area_validate(server.base, token, examples_dir)
            area_external_idp(binary)
    finally:
        server.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", required=True)
    ap.add_argument("--examples", required=True, help="the unpacked hl7.fhir.r4.examples package directory")
    ap.add_argument("--backends", default="sqlite,postgres")
    args = ap.parse_args()
    started = time.time()
    for backend in args.backends.split(","):
        t0 = time.time()
        if backend == "sqlite":
            run_backend("sqlite", args.binary, args.examples)
        elif backend == "postgres":
            cluster = PgCluster()
            try:
                run_backend("postgres", args.binary, args.examples, cluster.url)
            finally:
                cluster.stop()
        else:
            sys.exit(f"unknown backend {backend}")
        print(f"{backend}: {time.time() - t0:.0f}s", file=sys.stderr)
    print(f"\n{'area':<14}{'passed':>8}{'failed':>8}{'known':>8}")
    for area in AREAS:
        print(f"{area:<14}{RESULTS.passed[area]:>8}{RESULTS.failed[area]:>8}{RESULTS.known[area]:>8}")
    for i, rule in enumerate(RESULTS.rules):
        print(f"  known ({RESULTS.rule_hits[i]}x): {rule['reason']}")
    for area in AREAS:
        for f in RESULTS.failures[area]:
            print(f"  FAIL {area}: {f}")
    passed, failed = sum(RESULTS.passed.values()), sum(RESULTS.failed.values())
    known = sum(RESULTS.known.values())
    print(f"\n{passed} passed, {failed} failed ({known} known failures explained in conformance/known-failures.json; "
          f"{time.time() - started:.0f}s; backends {args.backends})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
