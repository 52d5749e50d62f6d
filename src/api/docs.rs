//! The OpenAPI 3.1 document (`/openapi.json`) and its browsable page (`/docs`, Swagger UI from
//! utoipa-swagger-ui's vendored assets: no CDN). Generated with utoipa's builders from what the
//! CapabilityStatement is generated from: the resource types the validator knows, the search
//! registry (the same `supported` parameters), the same interactions. Request and response
//! bodies reference the official R4 JSON Schema, whose definitions are the document's component
//! schemas. Built once at start-up; `openapi/openapi.json` is its committed copy (a test fails
//! when they differ).

use crate::fhir::validate::Validator;
use crate::search::{ParamType, Registry};
use serde_json::{json, Value};
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItemBuilder};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, ObjectBuilder, OpenApiBuilder, PathsBuilder, Ref, Required,
    ResponseBuilder, Type,
};

const FHIR_JSON: &str = "application/fhir+json";
const SECURITY: &str = "smart";

/// The `Prefer` header of a create or update.
const WRITE_PREFER: &str = "return=minimal, representation or OperationOutcome; handling=lenient drops \
     elements R4 does not know instead of refusing the resource (each listed as a warning with \
     return=OperationOutcome); strict is the default";

fn string_schema() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn path_param(name: &str, description: &str) -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .description(Some(description))
        .schema(Some(string_schema().pattern(Some("^[A-Za-z0-9\\-\\.]{1,64}$"))))
        .build()
}

fn query_param(name: &str, description: &str) -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(string_schema()))
        .build()
}

fn header_param(name: &str, description: &str) -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(string_schema()))
        .build()
}

/// A response whose body is the named R4 schema.
fn body_response(description: &str, schema: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            FHIR_JSON,
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(schema)))
                .build(),
        )
        .build()
}

/// The error responses every FHIR interaction can give, as OperationOutcomes.
fn with_errors(op: OperationBuilder, codes: &[(&str, &str)]) -> OperationBuilder {
    let mut op = op;
    for (code, why) in [
        ("400", "Invalid request (OperationOutcome)"),
        ("401", "Missing or invalid bearer token (OperationOutcome)"),
        ("403", "The token's scopes do not allow it (OperationOutcome)"),
        ("429", "Too many requests (OperationOutcome)"),
        (
            "503",
            "Unavailable, for example the audit log cannot be written (OperationOutcome)",
        ),
    ]
    .into_iter()
    .chain(codes.iter().copied())
    {
        op = op.response(code, body_response(why, "OperationOutcome"));
    }
    op
}

fn operation(id: String, tag: &str, summary: String, scopes: Vec<String>) -> OperationBuilder {
    OperationBuilder::new()
        .operation_id(Some(id))
        .tag(tag)
        .summary(Some(summary))
        .security(SecurityRequirement::new(SECURITY, scopes))
}

fn resource_body(t: &str) -> utoipa::openapi::request_body::RequestBody {
    RequestBodyBuilder::new()
        .required(Some(Required::True))
        .content(
            FHIR_JSON,
            ContentBuilder::new().schema(Some(Ref::from_schema_name(t))).build(),
        )
        .build()
}

/// The description of a search parameter: its type, and how identifying ones are searched.
fn param_description(kind: ParamType, phi: bool) -> String {
    let kind = format!("{kind:?}").to_lowercase();
    if phi {
        format!("{kind} (identifying: matched through blind indexes; exact, prefix and :contains)")
    } else {
        kind
    }
}

/// The whole document.
pub fn document(validator: &Validator, registry: &Registry, base_path: &str) -> Value {
    let mut paths = PathsBuilder::new();
    let mut types: Vec<&str> = validator.resource_types().collect();
    types.sort();
    let scope = |context: &str, t: &str, perm: &str| format!("{context}/{t}.{perm}");
    let scopes = |t: &str, perm: &str| {
        vec![
            scope("user", t, perm),
            scope("system", t, perm),
            scope("patient", t, perm),
        ]
    };
    for t in &types {
        let t = *t;
        let base = format!("{base_path}/{t}");
        if t == "AuditEvent" {
            // read-only: written by the server itself
            let search = with_errors(
                operation(
                    "search-AuditEvent".into(),
                    t,
                    "Search the audit log".into(),
                    vec!["system/AuditEvent.rs".into(), "user/AuditEvent.rs".into()],
                ),
                &[],
            )
            .parameters(Some(
                crate::store::audit::search::AUDIT_SEARCH_PARAMS
                    .iter()
                    .chain(&["_count", "_sort", "_total", "_summary", "_elements", "_include"])
                    .map(|p| query_param(p, "AuditEvent search parameter")),
            ))
            .response("200", body_response("A searchset Bundle", "Bundle"));
            paths = paths.path(&base, PathItemBuilder::new().operation(HttpMethod::Get, search).build());
            let read = with_errors(
                operation(
                    "read-AuditEvent".into(),
                    t,
                    "Read an AuditEvent".into(),
                    vec!["system/AuditEvent.rs".into(), "user/AuditEvent.rs".into()],
                ),
                &[("404", "Not found (OperationOutcome)")],
            )
            .parameter(path_param("id", "Logical id"))
            .response("200", body_response("The AuditEvent", t));
            paths = paths.path(
                format!("{base}/{{id}}"),
                PathItemBuilder::new().operation(HttpMethod::Get, read).build(),
            );
            continue;
        }
        let mut search_params: Vec<_> = registry
            .params(t)
            .filter(|p| crate::search::query::supported(p))
            .map(|p| query_param(&p.code, &param_description(p.kind, p.phi)))
            .collect();
        for (name, what) in [
            ("_count", "Page size (at most the configured maximum)"),
            ("_sort", "Sort keys, comma-separated, `-` for descending"),
            ("_total", "none, estimate or accurate"),
            ("_summary", "true, text, data, count or false"),
            ("_elements", "Top-level elements to return"),
            ("_include", "Source:param[:Target], or *"),
            ("_revinclude", "Source:param[:Target], or *"),
            ("_page", "Opaque page token from a link of an earlier page"),
        ] {
            search_params.push(query_param(name, what));
        }
        let search = with_errors(
            operation(format!("search-{t}"), t, format!("Search {t}"), scopes(t, "rs")),
            &[],
        )
        .parameters(Some(search_params))
        .parameter(header_param("Prefer", "handling=strict or handling=lenient"))
        .response("200", body_response("A searchset Bundle", "Bundle"));
        let create = with_errors(
            operation(format!("create-{t}"), t, format!("Create a {t}"), scopes(t, "c")),
            &[
                ("412", "The If-None-Exist condition matched several (OperationOutcome)"),
                ("422", "Not a valid resource (OperationOutcome)"),
            ],
        )
        .parameter(header_param("If-None-Exist", "Conditional create: a search query"))
        .parameter(header_param("Prefer", WRITE_PREFER))
        .request_body(Some(resource_body(t)))
        .response("201", body_response("Created", t))
        .response("200", body_response("The If-None-Exist condition matched this one", t));
        let conditional_update = with_errors(
            operation(
                format!("conditional-update-{t}"),
                t,
                format!("Update the {t} the query matches, or create it"),
                scopes(t, "cu"),
            ),
            &[
                ("412", "The condition matched several (OperationOutcome)"),
                ("422", "Not a valid resource (OperationOutcome)"),
            ],
        )
        .parameter(header_param("Prefer", WRITE_PREFER))
        .request_body(Some(resource_body(t)))
        .response("200", body_response("Updated", t))
        .response("201", body_response("Created", t));
        let conditional_delete = with_errors(
            operation(
                format!("conditional-delete-{t}"),
                t,
                format!("Delete the {t} the query matches"),
                scopes(t, "d"),
            ),
            &[("412", "The condition matched several (OperationOutcome)")],
        )
        .response(
            "200",
            body_response("Deleted, or nothing to delete", "OperationOutcome"),
        );
        paths = paths.path(
            &base,
            PathItemBuilder::new()
                .operation(HttpMethod::Get, search)
                .operation(HttpMethod::Post, create)
                .operation(HttpMethod::Put, conditional_update)
                .operation(HttpMethod::Delete, conditional_delete)
                .build(),
        );
        let search_post = with_errors(
            operation(
                format!("search-post-{t}"),
                t,
                format!("Search {t} with the parameters in a form body (kept out of the URL)"),
                scopes(t, "rs"),
            ),
            &[],
        )
        .request_body(Some(
            RequestBodyBuilder::new()
                .content(
                    "application/x-www-form-urlencoded",
                    ContentBuilder::new()
                        .schema(Some(ObjectBuilder::new().schema_type(Type::Object)))
                        .build(),
                )
                .build(),
        ))
        .response("200", body_response("A searchset Bundle", "Bundle"));
        paths = paths.path(
            format!("{base}/_search"),
            PathItemBuilder::new().operation(HttpMethod::Post, search_post).build(),
        );
        let not_found = [
            ("404", "Not found (OperationOutcome)"),
            ("410", "Deleted (OperationOutcome)"),
        ];
        let read = with_errors(
            operation(format!("read-{t}"), t, format!("Read a {t}"), scopes(t, "r")),
            &not_found,
        )
        .parameter(path_param("id", "Logical id"))
        .response("200", body_response("The current version", t));
        let update = with_errors(
            operation(
                format!("update-{t}"),
                t,
                format!("Update (or create) a {t}"),
                scopes(t, "u"),
            ),
            &[
                ("409", "Version conflict (OperationOutcome)"),
                ("412", "If-Match does not match the current version (OperationOutcome)"),
                ("422", "Not a valid resource (OperationOutcome)"),
            ],
        )
        .parameter(path_param("id", "Logical id"))
        .parameter(header_param("If-Match", "Expected version: W/\"n\""))
        .parameter(header_param("Prefer", WRITE_PREFER))
        .request_body(Some(resource_body(t)))
        .response("200", body_response("Updated", t))
        .response("201", body_response("Created", t));
        let delete = with_errors(
            operation(format!("delete-{t}"), t, format!("Delete a {t}"), scopes(t, "d")),
            &[
                (
                    "404",
                    "Not a valid id, or not a resource the token may see (OperationOutcome)",
                ),
                ("412", "If-Match does not match the current version (OperationOutcome)"),
            ],
        )
        .parameter(path_param("id", "Logical id"))
        .parameter(header_param("If-Match", "Expected version: W/\"n\""))
        .response(
            "200",
            body_response("Deleted, or nothing to delete", "OperationOutcome"),
        );
        let patch = with_errors(
            operation(
                format!("patch-{t}"),
                t,
                format!("Patch a {t} (JSON Patch or FHIRPath Patch)"),
                scopes(t, "u"),
            ),
            &[
                ("412", "If-Match does not match the current version (OperationOutcome)"),
                (
                    "422",
                    "The patch does not apply, or its result is not valid (OperationOutcome)",
                ),
            ],
        )
        .parameter(path_param("id", "Logical id"))
        .parameter(header_param("If-Match", "Expected version: W/\"n\""))
        .request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content(
                    crate::fhir::patch::JSON_PATCH,
                    ContentBuilder::new()
                        .schema(Some(
                            ObjectBuilder::new()
                                .schema_type(utoipa::openapi::schema::Type::Array)
                                .description(Some("RFC 6902 operations")),
                        ))
                        .build(),
                )
                .content(
                    FHIR_JSON,
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Parameters")))
                        .build(),
                )
                .build(),
        ))
        .response("200", body_response("Patched", t));
        paths = paths.path(
            format!("{base}/{{id}}"),
            PathItemBuilder::new()
                .operation(HttpMethod::Get, read)
                .operation(HttpMethod::Put, update)
                .operation(HttpMethod::Patch, patch)
                .operation(HttpMethod::Delete, delete)
                .build(),
        );
        let history = |id: String, summary: String, with_id: bool| {
            let errors: &[(&str, &str)] = if with_id {
                &[("404", "Not a valid id (OperationOutcome)")]
            } else {
                &[]
            };
            let mut op = with_errors(operation(id, t, summary, scopes(t, "r")), errors)
                .parameter(query_param("_count", "Page size"))
                .parameter(query_param("_since", "Only versions since this instant"))
                .response("200", body_response("A history Bundle", "Bundle"));
            if with_id {
                op = op.parameter(path_param("id", "Logical id"));
            }
            PathItemBuilder::new().operation(HttpMethod::Get, op).build()
        };
        paths = paths.path(
            format!("{base}/_history"),
            history(format!("history-type-{t}"), format!("History of every {t}"), false),
        );
        paths = paths.path(
            format!("{base}/{{id}}/_history"),
            history(format!("history-instance-{t}"), format!("History of a {t}"), true),
        );
        let vread = with_errors(
            operation(
                format!("vread-{t}"),
                t,
                format!("Read a version of a {t}"),
                scopes(t, "r"),
            ),
            &not_found,
        )
        .parameter(path_param("id", "Logical id"))
        .parameter(path_param("vid", "Version id"))
        .response("200", body_response("That version", t));
        paths = paths.path(
            format!("{base}/{{id}}/_history/{{vid}}"),
            PathItemBuilder::new().operation(HttpMethod::Get, vread).build(),
        );
        if t != "AuditEvent" {
            let validate = |id: String, instance: bool, get: bool| {
                let mut op = with_errors(
                    operation(
                        id,
                        t,
                        format!("Validate a {t} (R4 schema and definitions, profiles); an OperationOutcome"),
                        scopes(t, "c"),
                    ),
                    &[("404", "Not found (OperationOutcome)")],
                );
                if instance {
                    op = op.parameter(path_param("id", "Logical id"));
                }
                op = op
                    .parameter(query_param("mode", "create, update or delete"))
                    .parameter(query_param("profile", "A profile's canonical URL to validate against"));
                if !get {
                    op = op.request_body(Some(resource_body(t)));
                }
                op.response(
                    "200",
                    body_response("The issues found (information only when none)", "OperationOutcome"),
                )
            };
            paths = paths.path(
                format!("{base}/$validate"),
                PathItemBuilder::new()
                    .operation(HttpMethod::Post, validate(format!("validate-{t}"), false, false))
                    .build(),
            );
            paths = paths.path(
                format!("{base}/{{id}}/$validate"),
                PathItemBuilder::new()
                    .operation(
                        HttpMethod::Post,
                        validate(format!("validate-instance-{t}"), true, false),
                    )
                    .operation(HttpMethod::Get, validate(format!("validate-stored-{t}"), true, true))
                    .build(),
            );
        }
        if t == "Patient" {
            let report = with_errors(
                operation(
                    "patient-access-report".into(),
                    t,
                    "Who accessed this patient's record, when and why".into(),
                    vec!["patient/AuditEvent.rs".into(), "user/AuditEvent.rs".into()],
                ),
                &[("404", "Not found (OperationOutcome)")],
            )
            .parameter(path_param("id", "The patient's logical id"))
            .response("200", body_response("A searchset Bundle of AuditEvents", "Bundle"));
            paths = paths.path(
                format!("{base}/{{id}}/$access-report"),
                PathItemBuilder::new().operation(HttpMethod::Get, report).build(),
            );
            let everything = with_errors(
                operation(
                    "patient-everything".into(),
                    t,
                    "Everything in the patient's compartment (the types the token may search)".into(),
                    vec!["patient/*.rs".into(), "user/*.rs".into(), "system/*.rs".into()],
                ),
                &[(
                    "404",
                    "No such patient, or not one the token may see (OperationOutcome)",
                )],
            )
            .parameter(path_param("id", "The patient's logical id"))
            .parameter(query_param(
                "start",
                "Care dates from (the types with a `date` parameter)",
            ))
            .parameter(query_param("end", "Care dates to"))
            .parameter(query_param("_since", "Only resources updated since this instant"))
            .parameter(query_param("_type", "Resource types, comma-separated (repeatable)"))
            .parameter(query_param(
                "patient",
                "Patient and Group level: only these patients (Patient/[id], comma-separated)",
            ))
            .parameter(query_param(
                "_elements",
                "[type.]element names: only these (and the mandatory) elements, marked SUBSETTED",
            ))
            .parameter(query_param("_count", "Page size"))
            .response("200", body_response("A searchset Bundle", "Bundle"));
            paths = paths.path(
                format!("{base}/{{id}}/$everything"),
                PathItemBuilder::new().operation(HttpMethod::Get, everything).build(),
            );
        }
        if t == "Subscription" {
            let scopes = || vec!["user/Subscription.r".into(), "system/Subscription.r".into()];
            let status = |id: String, instance: bool| {
                let op = with_errors(
                    operation(
                        id,
                        t,
                        "Where subscriptions stand: a searchset Bundle of SubscriptionStatus Parameters".into(),
                        scopes(),
                    ),
                    &[(
                        "404",
                        "No such subscription, or not one the token may read (OperationOutcome)",
                    )],
                );
                let op = if instance {
                    op.parameter(path_param("id", "The subscription's logical id"))
                } else {
                    op.parameter(query_param("id", "Subscription ids, comma-separated (repeatable)"))
                };
                op.response("200", body_response("A searchset Bundle", "Bundle"))
            };
            paths = paths.path(
                format!("{base}/{{id}}/$status"),
                PathItemBuilder::new()
                    .operation(HttpMethod::Get, status("subscription-status".into(), true))
                    .operation(HttpMethod::Post, status("subscription-status-post".into(), true))
                    .build(),
            );
            paths = paths.path(
                format!("{base}/$status"),
                PathItemBuilder::new()
                    .operation(HttpMethod::Get, status("subscriptions-status".into(), false))
                    .build(),
            );
            let events = |id: String| {
                with_errors(
                    operation(
                        id,
                        t,
                        "A subscription's past events by number, as a notification Bundle".into(),
                        scopes(),
                    ),
                    &[(
                        "404",
                        "No such subscription, or not one the token may read (OperationOutcome)",
                    )],
                )
                .parameter(path_param("id", "The subscription's logical id"))
                .parameter(query_param("eventsSinceNumber", "The first event number"))
                .parameter(query_param("eventsUntilNumber", "The last event number"))
                .parameter(query_param("content", "empty, id-only or full-resource"))
                .response(
                    "200",
                    body_response("A history Bundle, the SubscriptionStatus first", "Bundle"),
                )
            };
            paths = paths.path(
                format!("{base}/{{id}}/$events"),
                PathItemBuilder::new()
                    .operation(HttpMethod::Get, events("subscription-events".into()))
                    .operation(HttpMethod::Post, events("subscription-events-post".into()))
                    .build(),
            );
        }
    }
    // the patient compartment, and the system level
    let compartment = with_errors(
        operation(
            "search-patient-compartment".into(),
            "system",
            "Search one resource type within a patient's compartment".into(),
            vec!["patient/*.rs".into(), "user/*.rs".into(), "system/*.rs".into()],
        ),
        &[("404", "Not found (OperationOutcome)")],
    )
    .parameter(path_param("id", "The patient's logical id"))
    .parameter(path_param("type", "A resource type in the patient compartment"))
    .response("200", body_response("A searchset Bundle", "Bundle"));
    paths = paths.path(
        format!("{base_path}/Patient/{{id}}/{{type}}"),
        PathItemBuilder::new().operation(HttpMethod::Get, compartment).build(),
    );
    let system_search = with_errors(
        operation(
            "search-system".into(),
            "system",
            "Search several resource types (_type) with their common parameters".into(),
            vec!["user/*.rs".into(), "system/*.rs".into()],
        ),
        &[],
    )
    .parameter(
        ParameterBuilder::new()
            .name("_type")
            .parameter_in(ParameterIn::Query)
            .required(Required::True)
            .description(Some("Resource types, comma-separated"))
            .schema(Some(string_schema()))
            .build(),
    )
    .response("200", body_response("A searchset Bundle", "Bundle"));
    let bundle = with_errors(
        operation(
            "batch-transaction".into(),
            "system",
            "A batch or transaction Bundle: each entry authorized and audited as if sent alone; a transaction commits all entries or none".into(),
            vec!["user/*.cruds".into(), "system/*.cruds".into(), "patient/*.cruds".into()],
        ),
        &[
            ("412", "A conditional entry matched several resources (OperationOutcome naming the entry)"),
            ("413", "More entries than max_bundle_entries (OperationOutcome)"),
        ],
    )
    .parameter(header_param(
        "Prefer",
        "return=representation to include each entry's resource; handling=lenient drops elements R4 \
         does not know, listed as warnings in each entry's response.outcome",
    ))
    .request_body(Some(resource_body("Bundle")))
    .response("200", body_response("A batch-response or transaction-response Bundle", "Bundle"));
    paths = paths.path(
        base_path.to_string(),
        PathItemBuilder::new()
            .operation(HttpMethod::Get, system_search)
            .operation(HttpMethod::Post, bundle)
            .build(),
    );
    // Bulk Data export: kick-off at three levels, then the job's status and files
    let export_scopes = || vec!["system/*.rs".into(), "user/*.rs".into()];
    let kick_off = |id: &str, tag: &str, summary: &str, group: bool| {
        let mut op = with_errors(
            operation(id.into(), tag, summary.into(), export_scopes()),
            &[("404", "No such Group (OperationOutcome)")],
        );
        if group {
            op = op.parameter(path_param("id", "The Group's logical id"));
        }
        op.parameter(header_param("Prefer", "respond-async (required)"))
            .parameter(header_param("Accept", "application/fhir+json (required)"))
            .parameter(query_param("_outputFormat", "application/fhir+ndjson (the default)"))
            .parameter(query_param("_since", "Only resources changed after this instant"))
            .parameter(query_param("_type", "Resource types, comma-separated"))
            .parameter(query_param(
                "_typeFilter",
                "[type]?[search parameters]: only the resources of that type the search selects",
            ))
            .parameter(query_param(
                "_elements",
                "[type.]element names: only these (and mandatory) elements, marked SUBSETTED",
            ))
            .parameter(query_param(
                "includeAssociatedData",
                "LatestProvenanceResources (the last recorded Provenance of each exported resource) or \
                 RelevantProvenanceResources (every Provenance targeting one)",
            ))
            .response(
                "202",
                ResponseBuilder::new()
                    .description("Accepted: poll the Content-Location URL")
                    .build(),
            )
    };
    // the same by POST, its parameters (and `patient` references) in a Parameters resource
    let kick_off_post = |id: &str, tag: &str, summary: &str, group: bool| {
        kick_off(
            &format!("{id}-post"),
            tag,
            &format!("{summary} (Parameters body)"),
            group,
        )
        .request_body(Some(resource_body("Parameters")))
    };
    paths = paths.path(
        format!("{base_path}/$export"),
        PathItemBuilder::new()
            .operation(
                HttpMethod::Get,
                kick_off("export", "system", "Bulk Data export of every resource type", false),
            )
            .operation(
                HttpMethod::Post,
                kick_off_post("export", "system", "Bulk Data export of every resource type", false),
            )
            .build(),
    );
    paths = paths.path(
        format!("{base_path}/Patient/$export"),
        PathItemBuilder::new()
            .operation(
                HttpMethod::Get,
                kick_off(
                    "patient-export",
                    "Patient",
                    "Bulk Data export of every patient's compartment",
                    false,
                ),
            )
            .operation(
                HttpMethod::Post,
                kick_off_post(
                    "patient-export",
                    "Patient",
                    "Bulk Data export of every patient's compartment",
                    false,
                ),
            )
            .build(),
    );
    paths = paths.path(
        format!("{base_path}/Group/{{id}}/$export"),
        PathItemBuilder::new()
            .operation(
                HttpMethod::Get,
                kick_off(
                    "group-export",
                    "Group",
                    "Bulk Data export of the compartments of a Group's members",
                    true,
                ),
            )
            .operation(
                HttpMethod::Post,
                kick_off_post(
                    "group-export",
                    "Group",
                    "Bulk Data export of the compartments of a Group's members",
                    true,
                ),
            )
            .build(),
    );
    let job_missing = [("404", "No such export, or not this client's (OperationOutcome)")];
    let poll = with_errors(
        operation(
            "export-status".into(),
            "system",
            "An export's progress (202 with X-Progress and Retry-After) or its manifest".into(),
            export_scopes(),
        ),
        &job_missing,
    )
    .parameter(path_param("job", "The export job"))
    .response(
        "200",
        ResponseBuilder::new()
            .description("The completion manifest (transactionTime, request, output files)")
            .build(),
    )
    .response("202", ResponseBuilder::new().description("Still running").build());
    let cancel = with_errors(
        operation(
            "export-cancel".into(),
            "system",
            "Cancel an export and delete its files".into(),
            export_scopes(),
        ),
        &job_missing,
    )
    .parameter(path_param("job", "The export job"))
    .response("202", body_response("Cancelled", "OperationOutcome"));
    paths = paths.path(
        format!("{base_path}/$export-status/{{job}}"),
        PathItemBuilder::new()
            .operation(HttpMethod::Get, poll)
            .operation(HttpMethod::Delete, cancel)
            .build(),
    );
    let download = with_errors(
        operation(
            "export-file".into(),
            "system",
            "One NDJSON file of a completed export".into(),
            export_scopes(),
        ),
        &job_missing,
    )
    .parameter(path_param("job", "The export job"))
    .parameter(path_param("file", "The file's number in the manifest"))
    .response(
        "200",
        ResponseBuilder::new()
            .description("application/fhir+ndjson: one resource per line")
            .build(),
    );
    paths = paths.path(
        format!("{base_path}/$export-file/{{job}}/{{file}}"),
        PathItemBuilder::new().operation(HttpMethod::Get, download).build(),
    );
    let system_history = with_errors(
        operation(
            "history-system".into(),
            "system",
            "History of every resource".into(),
            vec!["user/*.rs".into(), "system/*.rs".into()],
        ),
        &[],
    )
    .parameter(query_param("_count", "Page size"))
    .parameter(query_param("_since", "Only versions since this instant"))
    .response("200", body_response("A history Bundle", "Bundle"));
    paths = paths.path(
        format!("{base_path}/_history"),
        PathItemBuilder::new()
            .operation(HttpMethod::Get, system_history)
            .build(),
    );
    let metadata = OperationBuilder::new()
        .operation_id(Some("capabilities"))
        .tag("system")
        .summary(Some("The CapabilityStatement (no token needed)"))
        .response("200", body_response("The CapabilityStatement", "CapabilityStatement"));
    paths = paths.path(
        format!("{base_path}/metadata"),
        PathItemBuilder::new().operation(HttpMethod::Get, metadata).build(),
    );
    for (path, id, summary) in [
        ("/healthz", "healthz", "Liveness: the process answers"),
        ("/readyz", "readyz", "Readiness: database, keys and audit writer usable"),
        (
            "/metrics",
            "metrics",
            "Prometheus metrics (no paths, ids or queries in labels)",
        ),
    ] {
        let op = OperationBuilder::new()
            .operation_id(Some(id))
            .tag("operations")
            .summary(Some(summary))
            .response("200", ResponseBuilder::new().description("OK").build());
        paths = paths.path(path, PathItemBuilder::new().operation(HttpMethod::Get, op).build());
    }
    // the built-in SMART authorization server (`auth_server`, on by default)
    let form_body = |fields: &str| {
        RequestBodyBuilder::new()
            .required(Some(Required::True))
            .description(Some(fields.to_string()))
            .content("application/x-www-form-urlencoded", ContentBuilder::new().build())
            .build()
    };
    let oauth_errors = |op: OperationBuilder| {
        op.response(
            "400",
            ResponseBuilder::new()
                .description("RFC 6749 error: {\"error\": invalid_request | invalid_grant | unauthorized_client | unsupported_grant_type | invalid_scope, \"error_description\": …}")
                .build(),
        )
        .response(
            "401",
            ResponseBuilder::new()
                .description("invalid_client: client authentication failed (or a replayed or invalid assertion)")
                .build(),
        )
        .response("429", ResponseBuilder::new().description("Too many failed attempts from this address").build())
    };
    let json_ok = |d: &str| ResponseBuilder::new().description(d).build();
    for (path, id, summary, fields, ok) in [
        (
            "/auth/token",
            "oauth-token",
            "Token endpoint: authorization_code (with PKCE code_verifier), refresh_token (rotating), client_credentials (private_key_jwt RS384/ES384, or a client secret)",
            "grant_type, code, redirect_uri, code_verifier, refresh_token, scope, client_id, client_secret, client_assertion_type, client_assertion (HTTP Basic also accepted)",
            "access_token, token_type, expires_in, scope, refresh_token, id_token, patient, encounter, need_patient_banner",
        ),
        (
            "/auth/introspect",
            "oauth-introspect",
            "RFC 7662 introspection, for a confidential client or the bearer of a valid token",
            "token (and client authentication)",
            "{active, scope, client_id, sub, exp, patient, fhirUser …} or {active: false}",
        ),
        (
            "/auth/revoke",
            "oauth-revoke",
            "RFC 7009 revocation of an access token or a refresh token (its whole grant) by the client it was issued to",
            "token, token_type_hint (and client authentication)",
            "{} whether or not there was anything to revoke",
        ),
    ] {
        let op = oauth_errors(
            OperationBuilder::new()
                .operation_id(Some(id))
                .tag("authorization")
                .summary(Some(summary))
                .request_body(Some(form_body(fields)))
                .response("200", json_ok(ok)),
        );
        paths = paths.path(path, PathItemBuilder::new().operation(HttpMethod::Post, op).build());
    }
    for (path, id, summary) in [
        (
            "/auth/authorize",
            "oauth-authorize",
            "Authorization endpoint (response_type=code, PKCE S256 required, aud, scope, state, launch, nonce): the sign-in, TOTP and consent pages (HTML)",
        ),
        ("/auth/userinfo", "oidc-userinfo", "OpenID Connect userinfo of the token's user (sub, preferred_username, fhirUser)"),
        ("/auth/jwks", "oauth-jwks", "The JWK Set that verifies this server's access and ID tokens"),
        (
            "/.well-known/smart-configuration",
            "smart-configuration",
            "SMART App Launch 2 configuration (also under the FHIR base)",
        ),
        (
            "/.well-known/openid-configuration",
            "openid-configuration",
            "OpenID Connect discovery of the built-in authorization server",
        ),
    ] {
        let op = OperationBuilder::new()
            .operation_id(Some(id))
            .tag("authorization")
            .summary(Some(summary))
            .response("200", json_ok("OK"))
            .response("404", json_ok("The built-in authorization server is turned off"));
        paths = paths.path(path, PathItemBuilder::new().operation(HttpMethod::Get, op).build());
    }
    let bearer = Http::builder()
        .scheme(HttpAuthScheme::Bearer)
        .bearer_format("JWT")
        .description(Some(
            "An OAuth 2 access token carrying SMART App Launch scopes (v2 `patient/Observation.rs`, \
             `user/*.cruds`, `system/Patient.r`; v1 `patient/*.read`); from the built-in issuer \
             (`fhirvault token`) or a configured OpenID Connect provider.",
        ))
        .build();
    let doc = OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("fhirvault FHIR R4 API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "FHIR R4 REST API. Every interaction but the CapabilityStatement needs a bearer \
                     token whose SMART scopes allow it; errors are OperationOutcomes.",
                ))
                .build(),
        )
        .paths(paths.build())
        .components(Some(
            ComponentsBuilder::new()
                .security_scheme(SECURITY, SecurityScheme::Http(bearer))
                .build(),
        ))
        .build();
    let mut value = serde_json::to_value(&doc).unwrap_or_else(|_| json!({}));
    // the official R4 schema's definitions, as the component schemas the bodies reference
    if let Some(schemas) = r4_schemas() {
        value["components"]["schemas"] = schemas;
    }
    value
}

/// The definitions of HL7's R4 JSON Schema (fhir-schemas/fhir.schema.json), with their
/// references moved to `#/components/schemas/`.
fn r4_schemas() -> Option<Value> {
    let text = crate::fhir::R4_SCHEMA_JSON.replace("\"#/definitions/", "\"#/components/schemas/");
    let schema: Value = serde_json::from_str(&text).ok()?;
    schema.get("definitions").cloned()
}

/// The document, serialized once (compact: it is served as is, and it is large).
pub fn document_bytes(validator: &Validator, registry: &Registry, base_path: &str) -> Vec<u8> {
    serde_json::to_vec(&document(validator, registry, base_path)).unwrap_or_default()
}

/// `GET /openapi.json` (no token: it describes the API, holds no data).
pub async fn openapi_json(state: actix_web::web::Data<super::AppState>) -> actix_web::HttpResponse {
    // rendered on first request, and again once the search parameters changed
    let registry = state.search.current();
    let key = std::sync::Arc::as_ptr(&registry) as usize;
    let cached = state
        .openapi
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .filter(|r| r.registry == key)
        .map(|r| r.bytes.clone());
    let bytes = match cached {
        Some(b) => b,
        None => {
            let bytes = std::sync::Arc::new(document_bytes(&state.validator, &registry, &state.config.base_path));
            *state.openapi.write().unwrap_or_else(|p| p.into_inner()) = Some(super::metadata::Rendered {
                registry: key,
                bytes: bytes.clone(),
            });
            bytes
        }
    };
    actix_web::HttpResponse::Ok()
        .content_type("application/json")
        .body(bytes.as_ref().clone())
}

/// `/docs`: Swagger UI over `/openapi.json`, its assets compiled into the binary.
pub fn swagger_ui() -> utoipa_swagger_ui::SwaggerUi {
    utoipa_swagger_ui::SwaggerUi::new("/{_:.*}").config(utoipa_swagger_ui::Config::from("/openapi.json"))
}

/// `/docs` → `/docs/` (the page's assets are relative to it).
pub async fn to_docs_index() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Found()
        .insert_header((actix_web::http::header::LOCATION, "/docs/"))
        .finish()
}
