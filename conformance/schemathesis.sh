#!/usr/bin/env bash
# Schemathesis (PyPI) against a live fhirvault, from the committed openapi/openapi.json.
# Usage: conformance/schemathesis.sh FHIRVAULT_BINARY SCHEMATHESIS_BINARY
#
# Checks: no 5xx, responses valid against their documented schemas (the official R4 JSON
# Schema), status codes and content types as documented. Operations: every operation without a
# request body on five common types (read, vread, search, history, delete, conditional delete)
# and at the system level, the Patient operations, the audit log and metadata; a bounded
# number of generated cases each. Operations with a resource body (create, update, patch,
# bundles) are left out: Hypothesis cannot generate instances of the recursive R4 schema in any
# bounded time (measured: one create operation ran past ten minutes without a first case);
# tests/rest.rs, tests/bundle.rs and conformance/ exercise those with real resources.
set -euo pipefail
bin=$1
st=$2
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin" --data-dir "$dir" serve --listen "127.0.0.1:$port" >"$dir/server.log" 2>&1 &
server=$!
# the server drains on SIGTERM and records its stop: wait for it before removing its files
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.2
done
token=$("$bin" --data-dir "$dir" token --scope "system/*.cruds system/AuditEvent.rs" 2>/dev/null)
base="http://127.0.0.1:$port"
# a little data, so that searches and histories return entries to check against their schemas
for i in 1 2 3; do
  curl -fs -o /dev/null -X PUT -H "Authorization: Bearer $token" -H "Content-Type: application/fhir+json" \
    "$base/fhir/Patient/p$i" -d "{\"resourceType\":\"Patient\",\"id\":\"p$i\",\"name\":[{\"family\":\"Fam$i\"}],\"birthDate\":\"1970-0$i-01\"}"
  curl -fs -o /dev/null -X PUT -H "Authorization: Bearer $token" -H "Content-Type: application/fhir+json" \
    "$base/fhir/Observation/o$i" -d "{\"resourceType\":\"Observation\",\"id\":\"o$i\",\"status\":\"final\",\"code\":{\"text\":\"x\"},\"subject\":{\"reference\":\"Patient/p$i\"}}"
done
types='Patient|Observation|Encounter|Condition|Organization'
"$st" run "$(dirname "$0")/../openapi/openapi.json" \
  --url "$base" \
  -H "Authorization: Bearer $token" \
  --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance \
  --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-10}" \
  --workers 2 \
  --seed 1 \
  --include-operation-id-regex "^((read|vread|search|history-type|history-instance|delete|conditional-delete)-($types)|search-system|history-system|capabilities|patient-everything|patient-access-report|search-patient-compartment|read-AuditEvent|search-AuditEvent)\$"
